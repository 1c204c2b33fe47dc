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
from library.training.distributed import add_distributed_args
from library.training.objective import ObjectiveConfig

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


def add_objective_args(parser: argparse.ArgumentParser) -> None:
    """The objective options every family shares; each family adds how it samples timesteps and predicts."""
    g = parser.add_argument_group("training objective")
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


def objective_config(args: argparse.Namespace, **family: object) -> ObjectiveConfig:
    """The shared objective options from ``args``, with the family's own (timestep sampling, prediction type...)."""
    return ObjectiveConfig(
        weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
        mode_scale=args.mode_scale, loss_type=args.loss_type, huber_schedule=args.huber_schedule,
        huber_c=args.huber_c, huber_scale=args.huber_scale, ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength, noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength, min_timestep=args.min_timestep,
        max_timestep=args.max_timestep, **family,
    )  # fmt: skip


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


def blocks_to_swap_value(text: str) -> int | str:
    """``--blocks_to_swap``: a number of blocks, or ``auto`` (the fewest that fit the VRAM budget)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of blocks or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more blocks, got {value}")
    return value


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
    g.add_argument("--cpu_offload_checkpointing", action="store_true",
                   help="keep checkpointed blocks' inputs in host memory until backward (implies checkpointing)")  # fmt: skip
    g.add_argument("--blocks_to_swap", type=blocks_to_swap_value, default=None,
                   help="the denoiser's last N blocks stream from host memory (a double-stream block counts as two); "
                   "auto: the fewest that fit the VRAM budget")  # fmt: skip
    g.add_argument("--vram_budget", type=float, default=None,
                   help="GiB of accelerator memory to plan for (default: what is free); the run stops before loading "
                   "if its memory estimate does not fit")  # fmt: skip
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--full_bf16", action="store_true", help="keep trained weights and gradients in bf16")
    g.add_argument("--full_fp16", action="store_true", help="keep trained weights and gradients in fp16")
    g.add_argument("--fp8_base", action="store_true", help="store the base model's Linear weights in float8_e4m3fn")
    g.add_argument("--fp8_base_unet", action="store_true", help="fp8 for the denoiser only, text encoders in bf16/fp16")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8)
    g.add_argument("--persistent_data_loader_workers", action="store_true")
    for name, reason in ALWAYS_ON.items():
        g.add_argument(f"--{name}", action="store_true", help=f"accepted for compatibility: {reason}")
    g.add_argument("--highvram", action="store_true",
                   help="skip low-VRAM steps: frozen text encoders stay on the GPU after their outputs are cached")  # fmt: skip
    g.add_argument("--torch_compile", action="store_true", help="compile the denoiser's blocks with torch.compile")
    g.add_argument("--dynamo_backend", type=str, default="inductor", help="torch.compile backend (default inductor)")
    g.add_argument("--vae_latent_mean", action="store_true",
                   help="encode images to the VAE posterior's mean instead of a sample (mean + sigma * eps, upstream's)")  # fmt: skip
    g.add_argument("--device", type=str, default=None, help="cuda, cpu (default: cuda if available)")
    add_distributed_args(parser)


def add_saving_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving, state and resume")
    g.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "safetensors"],
                   help=FIXED_CHOICE["save_model_as"])  # fmt: skip
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


def add_validation_loop_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation loss (with validation_split)")
    g.add_argument("--validate_every_n_steps", type=int, default=None, help="also validate every N steps")
    g.add_argument("--validate_every_n_epochs", type=int, default=None,
                   help="validate every N epochs (default: every epoch when there are validation images)")  # fmt: skip
    g.add_argument("--max_validation_steps", type=int, default=None, help="validation batches per pass (default: all)")


# full fine-tuning's own options (the network recipe rejects them with the UNSUPPORTED reason)
FINETUNE_OPTIONS = ("mem_eff_save", "num_last_block_to_freeze", "fused_backward_pass", "blockwise_fused_optimizers")
FINETUNE_REJECTED = {
    "fused_optimizer_groups": "is marked [DOES NOT WORK] upstream; use --blockwise_fused_optimizers",
    "double_blocks_to_swap": "is deprecated upstream; use --blocks_to_swap (a double block counts as two)",
    "single_blocks_to_swap": "is deprecated upstream; use --blocks_to_swap (a double block counts as two)",
}


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("full fine-tuning")
    g.add_argument("--mem_eff_save", action="store_true", help="write checkpoints one tensor at a time (less RAM)")
    g.add_argument("--fused_backward_pass", action="store_true",
                   help="Adafactor steps each parameter as soon as its gradient is ready and frees the gradient")  # fmt: skip
    g.add_argument("--blockwise_fused_optimizers", action="store_true",
                   help="one optimizer per block, stepped as soon as the block's gradients are ready")  # fmt: skip
    g.add_argument("--num_last_block_to_freeze", type=int, default=None, help="keep the last N blocks frozen")
    g.add_argument("--skip_latents_validity_check", dest="skip_cache_check", action="store_true",
                   help="upstream's older name of --skip_cache_check")  # fmt: skip


def add_controlnet_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ControlNet")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="continue training this ControlNet (XLabs layout); default: a new one")  # fmt: skip
    g.add_argument("--controlnet_depth", type=int, default=2, help="double blocks of a new ControlNet (2, as XLabs)")
    g.add_argument("--controlnet_init_from_base", action="store_true",
                   help="start a new ControlNet from the base model's weights (as XLabs does)")  # fmt: skip


def add_sample_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images")
    g.add_argument("--sample_prompts", type=str, default=None, help=".txt, .toml or .json prompt file")
    g.add_argument("--sample_every_n_steps", type=int, default=None)
    g.add_argument("--sample_every_n_epochs", type=int, default=None)
    g.add_argument("--sample_at_first", action="store_true")
    g.add_argument(
        "--sample_sampler", type=str, default="euler", choices=["euler"], help=FIXED_CHOICE["sample_sampler"]
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
    g.add_argument("--network_module", type=str, default=None, help="the LoRA module of the model family")
    g.add_argument("--network_dim", type=int, default=4, help="the LoRA rank (default 4, as upstream)")
    g.add_argument("--network_alpha", type=float, default=1)
    g.add_argument("--network_dropout", type=float, default=None)
    g.add_argument("--scale_weight_norms", type=float, default=None, help="max-norm regularization of each LoRA "
                   "module's delta (1.0 is a common value)")  # fmt: skip
    g.add_argument("--network_args", type=str, default=None, nargs="*")
    g.add_argument("--network_weights", type=str, default=None, help="continue from this LoRA file")
    g.add_argument("--controlnet_model_name_or_path", type=str, default=None,
                   help="train alongside this frozen ControlNet; conditioning images are its control hints")  # fmt: skip
    g.add_argument("--base_weights", type=str, default=None, nargs="*",
                   help="LoRA files merged into the base model before training")  # fmt: skip
    g.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                   help="one multiplier per --base_weights file (default 1.0 each)")  # fmt: skip
    g.add_argument("--dim_from_weights", action="store_true")
    g.add_argument("--network_train_unet_only", action="store_true")
    g.add_argument("--network_train_text_encoder_only", action="store_true")
    g.add_argument("--unet_lr", type=float, default=None)
    g.add_argument("--text_encoder_lr", type=float, default=None, nargs="*", help="one value, or one per text encoder")


def add_config_file_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("configuration file")
    g.add_argument("--config_file", type=str, default=None, help="toml of options; the command line wins")
    g.add_argument("--output_config", action="store_true", help="write the given options to --config_file and exit")


# Upstream options that do not apply to training here, with the reason users see (families add their own).
UNSUPPORTED = {
    "v2": "is for SD 2.x models",
    "v_parameterization": "is for SD 2.x v-prediction models",
    "clip_skip": "is for SD1/SDXL text encoders",
    "max_token_length": "is for SD1/SDXL; use --t5xxl_max_token_length",
    "xformers": "is not used: attention runs through PyTorch SDPA",
    "mem_eff_attn": "is not used: attention runs through PyTorch SDPA",
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
    "fused_backward_pass": "is for the full fine-tuning scripts (a LoRA's gradients are small)",
    "blockwise_fused_optimizers": "is for the full fine-tuning scripts (a LoRA's gradients are small)",
    "conditioning_data_dir": "is for the ControlNet training script (upstream's ControlNet folder style); for "
    "--masked_loss mask images set conditioning_data_dir on each subset of a dataset config",
    "mem_eff_save": "is for the full fine-tuning scripts; a LoRA file is small",
    "num_last_block_to_freeze": "is for the full fine-tuning scripts; choose LoRA blocks with network_args",
    "save_n_epoch_ratio": "is not implemented; use --save_every_n_epochs",
}

# Upstream options with one possible value here: any other value is refused by argparse's choices.
FIXED_CHOICE = {
    "save_model_as": "safetensors, the only format written (other formats are refused)",
    "sample_sampler": "euler: samples use Euler flow sampling, the only sampler (others are refused)",
}

# Upstream options accepted because what they ask for is what this suite always does.
ALWAYS_ON = {
    "sdpa": "attention always runs through PyTorch's scaled dot-product attention",
    "use_safetensors": "models are always saved as safetensors",
    "disable_mmap_load_safetensors": "checkpoints are read tensor by tensor, never mapped as a whole",
    "lowram": "models are loaded straight onto their device",
}


class _Unsupported(argparse.Action):
    """An upstream option recognised only to be rejected with ``reason``."""

    def __init__(self, option_strings, dest, reason: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} {self.reason} and is not supported by this suite")


def add_unsupported_args(parser: argparse.ArgumentParser, names: dict[str, str] = UNSUPPORTED) -> None:
    g = parser.add_argument_group("upstream options that do not apply (rejected)")
    for name, reason in names.items():
        g.add_argument(f"--{name}", action=_Unsupported, nargs="?", default=None, help=argparse.SUPPRESS,
                       reason=reason)  # fmt: skip


def rejected_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The parser's rejected upstream options and their reasons."""
    return {a.dest: a.reason for a in parser._actions if isinstance(a, _Unsupported)}


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
    rejected = rejected_options(parser)
    for key in values:
        if key not in known:
            raise UserError(f"--config_file {path}: unknown option '{key}' (check the spelling against --help)")
        if key in rejected:
            raise UserError(f"--config_file {path}: '{key}' {rejected[key]} and is not supported by this suite")
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
    skip = {"config_file", "output_config", *SECRET_OPTIONS, *rejected_options(parser)}
    values = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in skip and v != defaults.get(k) and v is not None
    }
    path.write_text(toml.dumps(values), encoding="utf-8")
    logger.info("saved options to %s", path)


def sanitized_options(args: argparse.Namespace) -> dict:
    """The options with secrets removed, for --log_config and metadata."""
    return {k: v for k, v in vars(args).items() if k not in SECRET_OPTIONS}
