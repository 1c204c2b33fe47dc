"""The parts every training recipe shares, whatever it trains and on which family: option checks, the
accelerator, step counts, the learning-rate schedule, the data loader, trackers, loop settings and the start
position (``--initial_step``). A recipe (network, full model, ControlNet) assembles these around its target."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from pathlib import Path

import toml
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader

from library.data.dataset import data_loader_workers
from library.errors import UserError
from library.memory.compile import check_backend
from library.training import args as training_args
from library.training import distributed
from library.training.loop import LoopSettings, TrainState
from library.training.lr_schedulers import build_lr_scheduler, resolve_step_count
from library.training.objective import ObjectiveConfig
from library.training.optimizer_step import OptimizerStep
from library.training.validation import Validation, ValidationSettings, validation_timesteps

logger = logging.getLogger(__name__)


def check_common_options(args: argparse.Namespace) -> None:
    """Checks that hold for every recipe; intervals that are not positive are turned off with a warning."""
    if not args.output_dir:
        raise UserError("--output_dir is required (where to save)")
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
    if args.torch_compile:
        check_backend(args.dynamo_backend)
    distributed.check_distributed_args(args)


def weight_dtype(args: argparse.Namespace) -> torch.dtype:
    """The compute dtype of the frozen models, from --mixed_precision."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = None
    if args.log_with:
        if not args.logging_dir:
            raise UserError(f"--log_with {args.log_with} needs --logging_dir")
        log_with = ["tensorboard", "wandb"] if args.log_with == "all" else [args.log_with]
        for tracker in log_with:
            if importlib.util.find_spec(tracker) is None:
                raise UserError(f"--log_with {args.log_with} needs the {tracker} package: pip install {tracker}")
    return Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with, project_dir=args.logging_dir, cpu=args.device == "cpu",
        # a step's batch is split between the processes (DatasetGroup.shard), so the lr schedule steps once a step
        dataloader_config=DataLoaderConfiguration(split_batches=True), **distributed.accelerator_kwargs(args),
    )  # fmt: skip


def step_counts(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """(max_train_steps, num_epochs); --max_train_epochs overrides --max_train_steps as upstream."""
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_epochs:
        return args.max_train_epochs * updates_per_epoch, args.max_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / updates_per_epoch)


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, max_steps: int):
    return build_lr_scheduler(
        args.lr_scheduler_type or args.lr_scheduler, optimizer, num_training_steps=max_steps,
        num_warmup_steps=resolve_step_count(args.lr_warmup_steps, max_steps, "--lr_warmup_steps"),
        num_decay_steps=resolve_step_count(args.lr_decay_steps, max_steps, "--lr_decay_steps"),
        num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
        min_lr_ratio=args.lr_scheduler_min_lr_ratio, timescale=args.lr_scheduler_timescale,
        scheduler_args=args.lr_scheduler_args,
    )  # fmt: skip


def make_loader(args: argparse.Namespace, dataset, seed: int) -> DataLoader:
    """One batch per item (the dataset group batches by bucket). The loader has its own generator: starting an
    iterator (each epoch, and again on resume) must not draw from the global torch RNG the noise comes from, or a
    resumed run would see other noise than an uninterrupted one. Workers are capped at the CPUs, as upstream."""
    workers = data_loader_workers(args.max_data_loader_n_workers)
    return DataLoader(
        dataset, batch_size=1, sampler=dataset.sampler(), collate_fn=_first, num_workers=workers,
        persistent_workers=args.persistent_data_loader_workers and workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def make_validation(args: argparse.Namespace, accelerator: Accelerator, held_out, cfg: ObjectiveConfig,
                    seed: int) -> Validation | None:  # fmt: skip
    """The validation pass over held-out images (None without any): fixed timesteps, noise from
    --validation_seed (else --seed), every epoch unless --validate_every_n_epochs says otherwise."""
    if held_out is None:
        if args.validate_every_n_steps or args.validate_every_n_epochs or args.max_validation_steps:
            logger.warning("validation options are set but no images are held out: set validation_split")
        return None
    for option in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option} must be at least 1, got {value}")
    settings = ValidationSettings(
        seed=args.validation_seed if args.validation_seed is not None else seed, timesteps=validation_timesteps(cfg),
        every_n_steps=args.validate_every_n_steps, every_n_epochs=args.validate_every_n_epochs,
        max_steps=args.max_validation_steps,
    )  # fmt: skip
    loader = prepare_loader(accelerator, make_loader(args, held_out, settings.seed))
    logger.info("validation: %d batches at t = %s, seed %d", len(loader), settings.timesteps, settings.seed)
    return Validation(settings, loader)


def prepare_loader(accelerator: Accelerator, loader: DataLoader):
    """The loader as accelerate runs it (batches on the device, the end of an epoch known to gradient accumulation)
    but not split between processes: the dataset group already gives each process its part of every global batch
    (``DatasetGroup.shard``), so all processes have the same number of batches."""
    from accelerate.data_loader import prepare_data_loader

    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0,
                               put_on_device=True, non_blocking=False)  # fmt: skip


def _first(batch: list):
    return batch[0]


def init_trackers(args: argparse.Namespace, accelerator: Accelerator, default_name: str) -> None:
    """--log_with's trackers, with upstream's --log_tracker_config (a toml of each tracker's init arguments),
    --wandb_run_name and --wandb_api_key."""
    if not (accelerator.is_main_process and args.log_with):
        return
    init_kwargs: dict = {}
    if args.log_tracker_config:
        path = Path(args.log_tracker_config)
        if not path.is_file():
            raise UserError(f"--log_tracker_config {path}: file not found")
        try:
            init_kwargs = toml.loads(path.read_text(encoding="utf-8"))
        except toml.TomlDecodeError as e:
            raise UserError(f"--log_tracker_config {path}: not valid toml ({e})") from None
    if args.log_with in ("wandb", "all"):
        if args.wandb_api_key:
            import wandb

            wandb.login(key=args.wandb_api_key)
        if args.wandb_run_name:
            init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    accelerator.init_trackers(args.log_tracker_name or default_name, config=_tracker_config(args),
                              init_kwargs=init_kwargs)  # fmt: skip


def _tracker_config(args: argparse.Namespace) -> dict:
    if not args.log_config:
        return {}
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in training_args.sanitized_options(args).items()
    }


def loop_settings(args: argparse.Namespace, max_steps: int, num_epochs: int, seed: int,
                  control_hints: bool = False) -> LoopSettings:  # fmt: skip
    return LoopSettings(
        max_train_steps=max_steps, num_epochs=num_epochs, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm, save_every_n_steps=args.save_every_n_steps,
        save_every_n_epochs=args.save_every_n_epochs, save_last_n_steps=args.save_last_n_steps,
        save_last_n_epochs=args.save_last_n_epochs, save_last_n_steps_state=args.save_last_n_steps_state,
        save_last_n_epochs_state=args.save_last_n_epochs_state, save_state=args.save_state,
        save_state_on_train_end=args.save_state_on_train_end, sample_every_n_steps=args.sample_every_n_steps,
        sample_every_n_epochs=args.sample_every_n_epochs, sample_at_first=args.sample_at_first, seed=seed,
        log_prefix=args.log_prefix or "", masked_loss=args.masked_loss, control_hints=control_hints,
        check_sync=args.ddp_check_sync,
    )  # fmt: skip


def initial_state(args: argparse.Namespace, steps_per_epoch: int, optimizer_step: OptimizerStep) -> TrainState | None:
    """--initial_step / --initial_epoch without a state: the lr schedule (and with --skip_until_initial_step the
    data) continue from there. None when neither is given."""
    if args.initial_step is None and args.initial_epoch is None:
        return None
    step = args.initial_step if args.initial_step is not None else ((args.initial_epoch or 1) - 1) * steps_per_epoch
    state = TrainState(global_step=step, epoch=step // steps_per_epoch)
    if args.skip_until_initial_step:
        state.batches_in_epoch = (step % steps_per_epoch) * args.gradient_accumulation_steps
    optimizer_step.advance_schedule(step)
    logger.info("starting at step %d (epoch %d)%s", step, state.epoch + 1,
                ", skipping the data already trained" if args.skip_until_initial_step else "")  # fmt: skip
    return state


def resolve_seed(args: argparse.Namespace, started: float) -> int:
    """--seed, or one derived from the start time (recorded in the metadata either way)."""
    args.seed = args.seed if args.seed is not None else int(started) % 2**31
    return args.seed
