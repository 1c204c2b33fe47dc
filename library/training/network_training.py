"""Network (LoRA/OFT) training: options -> dataset -> models -> caches -> network -> optimizer -> the loop.

Everything is checked before the first model is loaded: options, the dataset config and its folders, the
sample prompt file. The model family is a plug (FLUX now); the loop is library/training/loop.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from library.data.dataset import DatasetOptions, add_dataset_args, build_dataset_group
from library.data.debug import show_dataset
from library.data.encode_caches import check_latents_cacheable, check_text_cacheable
from library.dtypes import parse_dtype
from library.errors import UserError
from library.memory.checkpointing import enable_block_checkpointing
from library.training import args as training_args
from library.training.checkpoints import CheckpointNaming
from library.training.families.flux import FluxFamily, FluxModelFiles, FluxTextSettings, load_flux_family
from library.training.loop import LoopSettings, TrainingRun, TrainState, fit, load_state
from library.training.lr_schedulers import build_lr_scheduler, resolve_step_count
from library.training.metadata import FLUX_IMPLEMENTATION, modelspec_architecture, modelspec_metadata, stringify
from library.training.objective import ObjectiveConfig
from library.training.optimizers import build_optimizer
from library.training.sample_prompts import load_sample_prompts
from library.training.targets import NetworkOptions, NetworkTarget, import_network_module

logger = logging.getLogger(__name__)


def build_flux_network_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FLUX.1 LoRA/OFT training (flux_train_network.py)")
    for add in (
        training_args.add_flux_model_args, add_dataset_args, training_args.add_objective_args,
        training_args.add_optimizer_args, training_args.add_training_args, training_args.add_saving_args,
        training_args.add_sample_args, training_args.add_logging_args, training_args.add_network_args,
        training_args.add_config_file_args, training_args.add_unsupported_args,
    ):  # fmt: skip
        add(parser)
    return parser


def objective_config(args: argparse.Namespace) -> ObjectiveConfig:
    return ObjectiveConfig(
        timestep_sampling=args.timestep_sampling, sigmoid_scale=args.sigmoid_scale,
        discrete_flow_shift=args.discrete_flow_shift, model_prediction_type=args.model_prediction_type,
        weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
        mode_scale=args.mode_scale, loss_type=args.loss_type, huber_schedule=args.huber_schedule,
        huber_c=args.huber_c, huber_scale=args.huber_scale, ip_noise_gamma=args.ip_noise_gamma,
        ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength, noise_offset=args.noise_offset,
        noise_offset_random_strength=args.noise_offset_random_strength, min_timestep=args.min_timestep,
        max_timestep=args.max_timestep,
    )  # fmt: skip


def _check_options(args: argparse.Namespace) -> None:
    required = {"pretrained_model_name_or_path": "the FLUX.1 checkpoint", "clip_l": "CLIP-L", "t5xxl": "T5-XXL",
                "ae": "the AE", "output_dir": "where to save"}  # fmt: skip
    for option, what in required.items():
        if not getattr(args, option):
            raise UserError(f"--{option} is required ({what})")
    for option in ("sample_every_n_steps", "sample_every_n_epochs", "save_every_n_steps", "save_every_n_epochs"):
        value = getattr(args, option)
        if value is not None and value <= 0:
            logger.warning("--%s %s: not positive, so it is disabled", option, value)
            setattr(args, option, None)
    if (args.sample_every_n_steps or args.sample_every_n_epochs or args.sample_at_first) and not args.sample_prompts:
        raise UserError("sample images were asked for but --sample_prompts is not given")
    if args.full_bf16 and args.mixed_precision != "bf16" or args.full_fp16 and args.mixed_precision != "fp16":
        raise UserError("--full_bf16 needs --mixed_precision bf16 and --full_fp16 needs --mixed_precision fp16")
    if args.gradient_accumulation_steps < 1 or args.max_train_steps < 1:
        raise UserError("--gradient_accumulation_steps and --max_train_steps must be at least 1")


def _weight_dtype(args: argparse.Namespace) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)


def _accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = None
    if args.log_with:
        if not args.logging_dir:
            raise UserError(f"--log_with {args.log_with} needs --logging_dir")
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
        for tracker in log_with:
            package = "tensorboard" if tracker == "tensorboard" else tracker
            if importlib.util.find_spec(package) is None:
                raise UserError(f"--log_with {args.log_with} needs the {package} package: pip install {package}")
    return Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with, project_dir=args.logging_dir, cpu=args.device == "cpu",
    )  # fmt: skip


def _create_network(args: argparse.Namespace, options: NetworkOptions, family: FluxFamily):
    module = import_network_module(options.module)
    encoders = family.text_encoders
    if options.dim_from_weights:
        network, _ = module.create_network_from_weights(
            1.0, options.weights, family.ae, encoders, family.flux, **options.args
        )
    else:
        if options.dim is None:
            raise UserError("--network_dim is required (the LoRA rank), unless --dim_from_weights")
        network = module.create_network(1.0, options.dim, options.alpha, family.ae, encoders, family.flux,
                                        neuron_dropout=options.dropout, **options.args)  # fmt: skip
    network.apply_to(encoders, family.flux, options.train_text_encoder, options.train_unet)
    if options.weights:
        network.load_weights(options.weights)
        logger.info("continuing from LoRA weights %s", options.weights)
    return network


def _step_counts(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs); --max_train_epochs overrides --max_train_steps as upstream."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        return args.max_train_epochs * updates_per_epoch, args.max_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / updates_per_epoch)


def _training_metadata(args: argparse.Namespace, family: FluxFamily, group, optimizer_name: str,
                       steps: tuple[int, int], started: float, network) -> dict[str, str]:  # fmt: skip
    """upstream's ss_* keys and modelspec.*; secrets are never among them."""
    if args.no_metadata:
        return {}
    dim, alpha = args.network_dim, args.network_alpha
    if args.dim_from_weights:  # the ranks came from the file: record the largest rank and its alpha
        largest = max(network.loras, key=lambda lora: lora.lora_dim)
        dim, alpha = largest.lora_dim, float(largest.alpha)
    width, height = group.resolution
    meta: dict[str, object] = {
        "ss_session_id": str(int(started * 1000) % 2**31), "ss_training_started_at": started,
        "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr, "ss_unet_lr": args.unet_lr,
        "ss_max_train_steps": steps[0], "ss_num_epochs": steps[1],
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps, "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler, "ss_network_module": args.network_module,
        "ss_network_dim": dim, "ss_network_alpha": alpha,
        "ss_network_dropout": args.network_dropout, "ss_network_args": _network_args_dict(args.network_args),
        "ss_mixed_precision": args.mixed_precision, "ss_full_fp16": args.full_fp16,
        "ss_base_model_version": family.base_model_version, "ss_seed": args.seed, "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm, "ss_scale_weight_norms": args.scale_weight_norms, "ss_noise_offset": args.noise_offset,
        "ss_ip_noise_gamma": args.ip_noise_gamma, "ss_loss_type": args.loss_type, "ss_huber_schedule": args.huber_schedule,
        "ss_huber_c": args.huber_c, "ss_huber_scale": args.huber_scale, "ss_fp8_base": args.fp8_base,
        "ss_fp8_base_unet": args.fp8_base_unet, "ss_training_comment": args.training_comment,
        "ss_sd_model_name": Path(args.pretrained_model_name_or_path).name, "ss_model_type": "flux",
        "ss_apply_t5_attn_mask": args.apply_t5_attn_mask, "ss_weighting_scheme": args.weighting_scheme,
        "ss_logit_mean": args.logit_mean, "ss_logit_std": args.logit_std, "ss_mode_scale": args.mode_scale,
        "ss_guidance_scale": args.guidance_scale, "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale, "ss_model_prediction_type": args.model_prediction_type,
        "ss_discrete_flow_shift": args.discrete_flow_shift, **group.metadata(),
    }  # fmt: skip
    meta.update(modelspec_metadata(
        architecture=modelspec_architecture("flux", family.variant, "lora"), implementation=FLUX_IMPLEMENTATION,
        title=args.metadata_title or f"{args.output_name or 'LoRA'}@{int(started)}", resolution=(width, height),
        timestamp=started, extra=_modelspec_extra(args),
    ))  # fmt: skip
    return stringify(meta)


def _modelspec_extra(args: argparse.Namespace) -> dict[str, str | None]:
    extra = {f: getattr(args, f"metadata_{f}") for f in training_args.METADATA_FIELDS if f != "title"}
    extra["is_negative_embedding"] = "True" if args.metadata_is_negative_embedding else None
    return extra


def _network_args_dict(entries: list[str] | None) -> dict[str, str] | None:
    return {k.strip(): v.strip() for k, _, v in (e.partition("=") for e in entries)} if entries else None


def _log_summary(args, family, group, network, steps, optimizer_name: str, accelerator: Accelerator) -> None:
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    memory = [name for name, on in (("fp8 base", args.fp8_base or args.fp8_base_unet),
              ("gradient checkpointing", args.gradient_checkpointing), ("cached latents", args.cache_latents),
              ("cached text encoder outputs", args.cache_text_encoder_outputs)) if on]  # fmt: skip
    logger.info(
        "training FLUX.1 %s LoRA on %s: %d trainable parameters in %d modules; %d steps (%d epochs); "
        "%d batches per epoch; gradient accumulation %d; optimizer %s; mixed precision %s; memory: %s",
        family.variant, accelerator.device, trainable, len(network.loras), steps[0], steps[1], len(group),
        args.gradient_accumulation_steps, optimizer_name, args.mixed_precision, ", ".join(memory) or "none",
    )  # fmt: skip
    logger.info("dataset:\n%s", group.summary())


def _prepare_family(args: argparse.Namespace, accelerator: Accelerator, group, train_text: bool) -> FluxFamily:
    weight_dtype = _weight_dtype(args)
    family = load_flux_family(
        FluxModelFiles(args.pretrained_model_name_or_path, args.clip_l, args.t5xxl, args.ae, args.clip_l_tokenizer,
                       args.t5xxl_tokenizer),
        FluxTextSettings(args.t5xxl_max_token_length, args.apply_t5_attn_mask),
        dtype=weight_dtype, device=accelerator.device, fp8_base=args.fp8_base or args.fp8_base_unet,
        guidance_scale=args.guidance_scale,
    )  # fmt: skip
    if group.options.cache_latents:
        group.cache_latents(family.latent_codec, is_main_process=accelerator.is_main_process)
    if group.options.cache_text_encoder_outputs:
        group.cache_text_encoder_outputs(family.text_codec, is_main_process=accelerator.is_main_process)
        if not train_text:  # only sample prompts need them now: keep them off the accelerator
            for encoder in family.text_encoders:
                encoder.to("cpu")
    accelerator.wait_for_everyone()
    if args.gradient_checkpointing:
        enable_block_checkpointing([*family.flux.double_blocks, *family.flux.single_blocks])
    return family


def _apply_initial_step(args: argparse.Namespace, steps_per_epoch: int, scheduler) -> TrainState:
    """--initial_step / --initial_epoch without a state: the lr schedule (and with --skip_until_initial_step the
    data) continue from there."""
    step = args.initial_step if args.initial_step is not None else ((args.initial_epoch or 1) - 1) * steps_per_epoch
    state = TrainState(global_step=step, epoch=step // steps_per_epoch)
    if args.skip_until_initial_step:
        state.batches_in_epoch = (step % steps_per_epoch) * args.gradient_accumulation_steps
    for _ in range(step):
        scheduler.step()
    logger.info("starting at step %d (epoch %d)%s", step, state.epoch + 1,
                ", skipping the data already trained" if args.skip_until_initial_step else "")  # fmt: skip
    return state


def run_network_training(args: argparse.Namespace) -> TrainState:
    started = time.time()
    _check_options(args)
    objective = objective_config(args)
    options = NetworkOptions.from_cli(
        args.network_module, args.network_dim, args.network_alpha, args.network_dropout, args.network_args,
        args.network_weights, args.dim_from_weights, args.network_train_unet_only, args.network_train_text_encoder_only,
    )  # fmt: skip
    seed = args.seed = args.seed if args.seed is not None else int(started) % 2**31
    group = build_dataset_group(DatasetOptions.from_args(args))
    if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
        if options.train_text_encoder:
            raise UserError("--cache_text_encoder_outputs cannot be used while training text-encoder LoRA; "
                            "add --network_train_unet_only")  # fmt: skip
        check_text_cacheable(group.all_items())
    if args.cache_latents or args.cache_latents_to_disk:
        check_latents_cacheable(group.all_items())
    if args.debug_dataset:
        show_dataset(group, Path(args.debug_dataset_dir) if args.debug_dataset_dir else None)
        return TrainState()
    prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else []
    accelerator = _accelerator(args)
    set_seed(seed)
    family = _prepare_family(args, accelerator, group, options.train_text_encoder)
    network = _create_network(args, options, family)
    params, _ = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    optimizer_name, optimizer = build_optimizer(
        args.optimizer_type or "AdamW", params, args.learning_rate, args.optimizer_args
    )
    max_steps, num_epochs = _step_counts(args, len(group))
    group.set_max_train_steps(max_steps)
    scheduler = build_lr_scheduler(
        args.lr_scheduler_type or args.lr_scheduler, optimizer, num_training_steps=max_steps * accelerator.num_processes,
        num_warmup_steps=resolve_step_count(args.lr_warmup_steps, max_steps, "--lr_warmup_steps"),
        num_decay_steps=resolve_step_count(args.lr_decay_steps, max_steps, "--lr_decay_steps"),
        num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
        min_lr_ratio=args.lr_scheduler_min_lr_ratio, timescale=args.lr_scheduler_timescale,
        scheduler_args=args.lr_scheduler_args,
    )  # fmt: skip
    workers = max(0, args.max_data_loader_n_workers)
    # the loader's own generator: starting an iterator (each epoch, and again on resume) must not draw from the
    # global torch RNG the noise comes from, or a resumed run would see other noise than an uninterrupted one
    loader = DataLoader(group, batch_size=1, sampler=group.sampler(), collate_fn=_first, num_workers=workers,
                        persistent_workers=args.persistent_data_loader_workers and workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    network, optimizer, loader, scheduler = accelerator.prepare(network, optimizer, loader, scheduler)
    if accelerator.is_main_process and args.log_with:
        accelerator.init_trackers(args.log_tracker_name or "network_train", config=_tracker_config(args))
    settings = _loop_settings(args, max_steps, num_epochs, seed)
    save_dtype = parse_dtype(args.save_precision, "--save_precision")
    run = TrainingRun(
        accelerator=accelerator, family=family,
        target=NetworkTarget(accelerator.unwrap_model(network), options.train_text_encoder, save_dtype, network),
        dataset=group, loader=loader, optimizer=optimizer, scheduler=scheduler, objective=objective,
        settings=settings, naming=CheckpointNaming(Path(args.output_dir), args.output_name),
        metadata=_training_metadata(args, family, group, optimizer_name, (max_steps, num_epochs), started,
                                    accelerator.unwrap_model(network)),
        weight_dtype=_weight_dtype(args), sample_prompts=prompts, sample_dir=Path(args.output_dir) / "sample",
    )  # fmt: skip
    _log_summary(
        args, family, group, accelerator.unwrap_model(network), (max_steps, num_epochs), optimizer_name, accelerator
    )
    state = None
    if args.resume:
        state = load_state(run, Path(args.resume))
    elif args.initial_step is not None or args.initial_epoch is not None:
        state = _apply_initial_step(args, math.ceil(len(group) / args.gradient_accumulation_steps), scheduler)
    state = fit(run, state)
    accelerator.end_training()
    return state


def _first(batch: list):
    return batch[0]


def _tracker_config(args: argparse.Namespace) -> dict:
    if not args.log_config:
        return {}
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in training_args.sanitized_options(args).items()
    }


def _loop_settings(args: argparse.Namespace, max_steps: int, num_epochs: int, seed: int) -> LoopSettings:
    return LoopSettings(
        max_train_steps=max_steps, num_epochs=num_epochs, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm, save_every_n_steps=args.save_every_n_steps,
        save_every_n_epochs=args.save_every_n_epochs, save_last_n_steps=args.save_last_n_steps,
        save_last_n_epochs=args.save_last_n_epochs, save_last_n_steps_state=args.save_last_n_steps_state,
        save_last_n_epochs_state=args.save_last_n_epochs_state, save_state=args.save_state,
        save_state_on_train_end=args.save_state_on_train_end, sample_every_n_steps=args.sample_every_n_steps,
        sample_every_n_epochs=args.sample_every_n_epochs, sample_at_first=args.sample_at_first, seed=seed,
        log_prefix=args.log_prefix or "", masked_loss=args.masked_loss, scale_weight_norms=args.scale_weight_norms,
    )  # fmt: skip
