"""Command-line options of the training scripts, with upstream's names and defaults, one helper per concern.

``--config_file`` reads a toml of options (tables are flattened, as upstream does; the command line wins);
``--output_config`` writes the given options to it. Options that upstream has but that make no sense for
these models are recognised and rejected with a clear line instead of being ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import toml

from library.errors import UserError

logger = logging.getLogger(__name__)

SECRET_OPTIONS = ("wandb_api_key", "huggingface_token")


def int_or_float(value: str) -> int | float:
    """``"100"`` -> 100 steps, ``"0.1"`` -> a ratio, ``"10%"`` -> 0.1 (upstream's --lr_warmup_steps forms)."""
    text = value.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100
    try:
        return int(text)
    except ValueError:
        return float(text)


def add_flux_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FLUX.1 models")
    g.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="FLUX.1 dev/schnell checkpoint or diffusers folder",
    )
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder (.safetensors)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL encoder (.safetensors)")
    g.add_argument("--ae", type=str, default=None, help="FLUX.1 autoencoder (ae.safetensors)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default 256 for schnell, 512 for dev")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in encoding and attention")
    g.add_argument("--clip_l_tokenizer", type=str, default=None, help="folder with another CLIP-L tokenizer")
    g.add_argument("--t5xxl_tokenizer", type=str, default=None, help="folder with another T5 tokenizer")
    g.add_argument("--model_type", type=str, default="flux", choices=["flux"], help="model family (flux)")


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training objective")
    g.add_argument(
        "--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"], default="sigma"
    )
    g.add_argument("--sigmoid_scale", type=float, default=1.0)
    g.add_argument("--discrete_flow_shift", type=float, default=3.0)
    g.add_argument("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled")
    g.add_argument("--guidance_scale", type=float, default=3.5, help="guidance value fed to FLUX.1 dev while training")
    g.add_argument(
        "--weighting_scheme",
        type=str,
        default="uniform",
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"],
    )
    g.add_argument("--logit_mean", type=float, default=0.0)
    g.add_argument("--logit_std", type=float, default=1.0)
    g.add_argument("--mode_scale", type=float, default=1.29)
    g.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"])
    g.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"])
    g.add_argument("--huber_c", type=float, default=0.1)
    g.add_argument("--huber_scale", type=float, default=1.0)
    g.add_argument("--masked_loss", action="store_true", help="use alpha or conditioning masks as loss masks")
    g.add_argument("--noise_offset", type=float, default=None)
    g.add_argument("--noise_offset_random_strength", action="store_true")
    g.add_argument("--ip_noise_gamma", type=float, default=None)
    g.add_argument("--ip_noise_gamma_random_strength", action="store_true")
    g.add_argument("--min_timestep", type=int, default=None, help="0-1000")
    g.add_argument("--max_timestep", type=int, default=None, help="0-1000")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")


def add_optimizer_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning rate")
    g.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="AdamW (default), AdamW8bit, Adafactor, Lion, Prodigy, RAdamScheduleFree, module.Class, ...",
    )
    g.add_argument(
        "--optimizer_args", type=str, default=None, nargs="*", help='e.g. "weight_decay=0.01" "betas=0.9,0.999"'
    )
    g.add_argument("--learning_rate", type=float, default=2e-6)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables gradient clipping")
    g.add_argument("--lr_scheduler", type=str, default="constant")
    g.add_argument("--lr_scheduler_type", type=str, default="", help="module.Class of a custom scheduler")
    g.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*")
    g.add_argument("--lr_warmup_steps", type=int_or_float, default=0, help="steps, a ratio (<1) or a percent")
    g.add_argument("--lr_decay_steps", type=int_or_float, default=0, help="steps, a ratio (<1) or a percent")
    g.add_argument("--lr_scheduler_num_cycles", type=int, default=1)
    g.add_argument("--lr_scheduler_power", type=float, default=1)
    g.add_argument("--lr_scheduler_timescale", type=int, default=None)
    g.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None)


METADATA_FIELDS = ("title", "author", "description", "license", "tags", "usage_hint", "trigger_phrase", "thumbnail",
                   "merged_from", "preprocessor")  # fmt: skip


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--output_name", type=str, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=1600)
    g.add_argument("--max_train_epochs", type=int, default=None, help="overrides --max_train_steps")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size when no dataset config sets one")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--full_bf16", action="store_true", help="keep trained weights and gradients in bf16")
    g.add_argument("--full_fp16", action="store_true", help="keep trained weights and gradients in fp16")
    g.add_argument("--fp8_base", action="store_true", help="store the base model's Linear weights in float8_e4m3fn")
    g.add_argument("--fp8_base_unet", action="store_true", help="fp8 for FLUX only, text encoders in bf16/fp16")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8)
    g.add_argument("--persistent_data_loader_workers", action="store_true")
    g.add_argument("--sdpa", action="store_true", help="scaled dot-product attention (always used)")
    for name, reason in ALWAYS_ON.items():
        g.add_argument(f"--{name}", action="store_true", help=f"accepted for compatibility: {reason}")
    g.add_argument("--highvram", action="store_true", help="keep cached latents on the GPU")
    g.add_argument("--device", type=str, default=None, help="cuda, cpu (default: cuda if available)")


def add_saving_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving, state and resume")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "safetensors"])
    g.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"])
    g.add_argument("--save_every_n_epochs", type=int, default=None)
    g.add_argument("--save_every_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_epochs", type=int, default=None)
    g.add_argument("--save_last_n_steps", type=int, default=None)
    g.add_argument("--save_last_n_epochs_state", type=int, default=None)
    g.add_argument("--save_last_n_steps_state", type=int, default=None)
    g.add_argument("--save_state", action="store_true", help="also save the training state with each model save")
    g.add_argument("--save_state_on_train_end", action="store_true")
    g.add_argument("--resume", type=str, default=None, help="a state folder written by --save_state")
    g.add_argument("--skip_until_initial_step", action="store_true")
    g.add_argument("--initial_step", type=int, default=None)
    g.add_argument("--initial_epoch", type=int, default=None)
    g.add_argument("--no_metadata", action="store_true", help="write no ss_*/modelspec metadata")
    g.add_argument("--training_comment", type=str, default=None)
    for field in METADATA_FIELDS:
        g.add_argument(f"--metadata_{field}", type=str, default=None, help=f"modelspec.{field}")
    g.add_argument("--metadata_is_negative_embedding", action="store_true", help="modelspec.is_negative_embedding")


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images")
    g.add_argument("--sample_prompts", type=str, default=None, help=".txt, .toml or .json prompt file")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument(
        "--sample_sampler", type=str, default="euler", choices=["euler"], help="FLUX samples with Euler flow"
    )


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--logging_dir", type=str, default=None)
    g.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"])
    g.add_argument("--log_prefix", type=str, default=None)
    g.add_argument("--log_tracker_name", type=str, default=None)
    g.add_argument("--log_tracker_config", type=str, default=None)
    g.add_argument("--log_config", action="store_true", help="log the options (secrets removed)")
    g.add_argument("--wandb_run_name", type=str, default=None)
    g.add_argument("--wandb_api_key", type=str, default=None)


def add_network_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network (LoRA/OFT)")
    g.add_argument("--network_module", type=str, default=None, help="networks.lora_flux or networks.oft_flux")
    g.add_argument("--network_dim", type=int, default=None)
    g.add_argument("--network_alpha", type=float, default=1)
    g.add_argument("--network_dropout", type=float, default=None)
    g.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularization of each LoRA "
                   "module's delta (1.0 is a common value)")  # fmt: skip
    g.add_argument("--network_args", type=str, default=None, nargs="*")
    g.add_argument("--network_weights", type=str, default=None, help="continue from this LoRA file")
    g.add_argument("--dim_from_weights", action="store_true")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*", help="one value, or CLIP-L then T5")


def add_config_file_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("configuration file")
    g.add_argument("--config_file", type=str, default=None, help="toml of options; the command line wins")
    g.add_argument("--output_config", action="store_true", help="write the given options to --config_file and exit")


# Upstream options that do not apply to FLUX.1/SD3 training here, with the reason users see.
UNSUPPORTED = {
    "v2": "is for SD 2.x models",
    "v_parameterization": "is for SD 2.x v-prediction models",
    "clip_skip": "is for SD1/SDXL text encoders",
    "max_token_length": "is for SD1/SDXL; use --t5xxl_max_token_length",
    "xformers": "is not used: attention runs through PyTorch SDPA",
    "mem_eff_attn": "is not used: attention runs through PyTorch SDPA",
    "vae": "is for SD models; give the FLUX.1 AE with --ae",
    "no_half_vae": "is for SD models",
    "use_8bit_adam": "is deprecated upstream; use --optimizer_type AdamW8bit",
    "use_lion_optimizer": "is deprecated upstream; use --optimizer_type Lion",
    "zero_terminal_snr": "is for DDPM noise schedules, not flow matching",
    "min_snr_gamma": "is for DDPM noise schedules, not flow matching",
    "debiased_estimation_loss": "is for DDPM noise schedules, not flow matching",
    "scale_v_pred_loss_like_noise_pred": "is for DDPM v-prediction",
    "v_pred_like_loss": "is for DDPM v-prediction",
    "multires_noise_iterations": "is not supported for flow-matching training",
    "adaptive_noise_scale": "is not supported for flow-matching training",
    "weighted_captions": "is not supported for T5 prompts",
    "split_mode": "is deprecated upstream; use --blocks_to_swap",
    "multires_noise_discount": "belongs to --multires_noise_iterations, which does not apply to flow matching",
    "dataset_class": "(a custom dataset class) is not supported; use a dataset config",
    "support_dreambooth": "is an option of upstream's config_util self-test",
    "support_finetuning": "is an option of upstream's config_util self-test",
    "support_controlnet": "is an option of upstream's config_util self-test",
    "support_dropout": "is an option of upstream's config_util self-test",
    "tokenizer_cache_dir": "is not needed: tokenizers ship with the suite (see --clip_l_tokenizer / --t5xxl_tokenizer)",
    "huggingface_repo_id": "(uploading to the Hugging Face Hub) is not implemented; upload the saved files yourself",
    "huggingface_repo_type": "(uploading to the Hugging Face Hub) is not implemented; upload the saved files yourself",
    "huggingface_path_in_repo": "(uploading to the Hugging Face Hub) is not implemented; upload the saved files yourself",
    "huggingface_token": "(uploading to the Hugging Face Hub) is not implemented; upload the saved files yourself",
    "huggingface_repo_visibility": "(uploading to the Hugging Face Hub) is not implemented; upload the files yourself",
    "save_state_to_huggingface": "(uploading to the Hugging Face Hub) is not implemented; upload the files yourself",
    "resume_from_huggingface": "(downloading a state from the Hub) is not implemented; download it and use --resume",
    "async_upload": "(uploading to the Hugging Face Hub) is not implemented; upload the saved files yourself",
    "blocks_to_swap": "is not implemented yet (block swap comes with full fine-tuning); use --fp8_base to save memory",
    "cpu_offload_checkpointing": "is not implemented yet (it comes with block swap and full fine-tuning)",
    "fused_backward_pass": "is not implemented yet (it comes with full fine-tuning)",
    "fp16_master_weights_and_gradients": "is not implemented yet (it comes with full fine-tuning)",
    "deepspeed": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "zero_stage": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "offload_optimizer_device": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "offload_optimizer_nvme_path": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "offload_param_device": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "offload_param_nvme_path": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "zero3_init_flag": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "zero3_save_16bit_model": "is not implemented yet (DeepSpeed comes with multi-GPU training)",
    "ddp_timeout": "is not implemented yet (it comes with multi-GPU training)",
    "ddp_gradient_as_bucket_view": "is not implemented yet (it comes with multi-GPU training)",
    "ddp_static_graph": "is not implemented yet (it comes with multi-GPU training)",
    "torch_compile": "is not implemented yet",
    "dynamo_backend": "is not implemented yet",
    "base_weights": "(merging LoRAs into the base before training) is not implemented yet",
    "base_weights_multiplier": "(merging LoRAs into the base before training) is not implemented yet",
    "controlnet_model_name_or_path": "(training a LoRA with a ControlNet) is not implemented yet",
    "save_n_epoch_ratio": "is not implemented; use --save_every_n_epochs",
    "validation_split": "(validation loss) is not implemented yet",
    "validation_seed": "(validation loss) is not implemented yet",
    "validate_every_n_steps": "(validation loss) is not implemented yet",
    "validate_every_n_epochs": "(validation loss) is not implemented yet",
    "max_validation_steps": "(validation loss) is not implemented yet",
}

# Upstream options accepted because what they ask for is what this suite always does.
ALWAYS_ON = {
    "use_safetensors": "models are always saved as safetensors",
    "disable_mmap_load_safetensors": "checkpoints are read tensor by tensor, never mapped as a whole",
    "lowram": "models are loaded straight onto their device",
}


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} {UNSUPPORTED[self.dest]} and is not supported by this suite")


def add_unsupported_args(parser: argparse.ArgumentParser, names: dict[str, str] = UNSUPPORTED) -> None:
    g = parser.add_argument_group("upstream options that do not apply (rejected)")
    for name in names:
        g.add_argument(f"--{name}", action=_Unsupported, nargs="?", default=None, help=argparse.SUPPRESS)


def _flatten(config: dict) -> dict:
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_args_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; with --config_file, its values are defaults that the command line overrides."""
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not args.config_file:
        if args.output_config:
            raise UserError("--output_config needs --config_file (the toml to write)")
        return args
    path = Path(args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml")
    if args.output_config:
        write_config(parser, args, path)
        raise SystemExit(0)
    if not path.is_file():
        raise UserError(f"--config_file {path}: file not found")
    try:
        values = _flatten(toml.loads(path.read_text(encoding="utf-8")))
    except toml.TomlDecodeError as e:
        raise UserError(f"--config_file {path}: not valid toml ({e})") from None
    known = {a.dest for a in parser._actions}
    for key in values:
        if key not in known:
            raise UserError(f"--config_file {path}: unknown option '{key}' (check the spelling against --help)")
        if key in UNSUPPORTED:
            raise UserError(f"--config_file {path}: '{key}' {UNSUPPORTED[key]} and is not supported by this suite")
    config_args = parser.parse_args(_to_argv(parser, values, path))
    return parser.parse_args(argv, namespace=_explicit_only(parser, config_args, values))


def _to_argv(parser: argparse.ArgumentParser, values: dict, path: Path) -> list[str]:
    """Turn config values into command-line tokens, so argparse checks their types and choices."""
    actions = {a.dest: a for a in parser._actions}
    tokens: list[str] = []
    for key, value in values.items():
        action = actions[key]
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UserError(f"--config_file {path}: '{key}' must be true or false, found {value!r}")
            tokens += [flag] if value else []
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)]
        elif value is not None:
            tokens += [f"{flag}={value}"]
    return tokens


def _explicit_only(
    parser: argparse.ArgumentParser, config_args: argparse.Namespace, values: dict
) -> argparse.Namespace:
    """A namespace holding only the config's values, so argparse fills the rest with defaults."""
    namespace = argparse.Namespace()
    for key in values:
        setattr(namespace, key, getattr(config_args, key))
    return namespace


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path) -> None:
    """Write the options that differ from their defaults (never secrets) to ``path``."""
    if path.exists():
        raise UserError(f"--config_file {path}: already exists; --output_config never overwrites")
    defaults = vars(parser.parse_args([]))
    skip = {"config_file", "output_config", *SECRET_OPTIONS}
    values = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in skip and k not in UNSUPPORTED and v != defaults.get(k) and v is not None
    }
    path.write_text(toml.dumps(values), encoding="utf-8")
    logger.info("saved options to %s", path)


def sanitized_options(args: argparse.Namespace) -> dict:
    """The options with secrets removed, for --log_config and metadata."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_OPTIONS}
