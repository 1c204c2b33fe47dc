"""The one training recipe: options -> dataset -> models -> caches -> what is trained -> optimizer -> the loop.

Everything is checked before the first model is loaded: options, the dataset config and its folders, the
sample prompt file. Two plugs make a run: the model family (``library/training/family.py``) and the plan of what
is trained (:class:`TrainingPlan`: a network in ``network_training.py``, the full model in ``full_training.py``).
The shared parts are ``library/training/session.py``; the loop is ``library/training/loop.py``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from library.data.dataset import DatasetOptions, build_dataset_groups
from library.data.debug import show_dataset
from library.data.encode_caches import Shard, check_latents_cacheable, check_text_cacheable
from library.dtypes import parse_dtype
from library.memory.checkpointing import enable_block_checkpointing
from library.memory.compile import compile_blocks
from library.training import distributed, session
from library.training.checkpoints import CheckpointNaming
from library.training.family import FamilySpec, LoadOptions, ModelFamily
from library.training.loop import TrainingRun, TrainingTarget, TrainState, fit, load_state
from library.training.optimizer_step import OptimizerStep, StepKind, build_optimizer_step
from library.training.optimizers import build_optimizer
from library.training.preflight import memory_preflight
from library.training.sample_prompts import load_sample_prompts

logger = logging.getLogger(__name__)


class TrainingPlan(Protocol):
    """What a recipe trains, around the shared steps. Methods are called in this order."""

    tracker_name: str  # the default --log_tracker_name
    full_model: bool  # the denoiser itself trains (for the memory estimate)
    estimates_memory: bool  # the memory pre-flight models this plan
    control_hints: bool  # conditioning images feed a ControlNet (set by check_args)
    device_placement: bool  # whether accelerate moves the trained module (False: the family placed it, e.g. swapped)

    def check_args(self, args: argparse.Namespace, spec: FamilySpec) -> None:
        """The plan's options and conflicts, before anything is loaded (UserError)."""

    @property
    def trains_text_encoders(self) -> bool: ...

    def load_options(self, args: argparse.Namespace, options: LoadOptions) -> LoadOptions:
        """How the family should load for this plan (e.g. the trained denoiser in fp32)."""

    def step_kind(self, args: argparse.Namespace, num_processes: int) -> StepKind:
        """How the optimizer steps (plain, fused backward, blockwise); UserError for options that cannot work."""

    def build(self, args: argparse.Namespace, family: ModelFamily) -> tuple[nn.Module, list[tuple[str, list]]]:
        """The module accelerate prepares (its parameters are the trained ones) and the named parameter groups
        ([(name, parameters or param-group dicts)]; blockwise optimizers make one optimizer per name)."""

    def target(self, module: nn.Module, prepared: nn.Module, save_dtype: torch.dtype | None) -> TrainingTarget: ...

    def metadata(self, args: argparse.Namespace, spec: FamilySpec, family: ModelFamily, groups: list,
                 optimizer_name: str, steps: tuple[int, int], started: float, module: nn.Module,
                 num_processes: int) -> dict[str, str]: ...  # fmt: skip

    def describe(self, module: nn.Module) -> str:
        """What is trained, for the start-up summary."""


def _check_caching(args: argparse.Namespace, groups: list) -> None:
    items = [item for group in groups for item in group.all_items()]
    if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk:
        check_text_cacheable(items)
    if args.cache_latents or args.cache_latents_to_disk:
        check_latents_cacheable(items)


def _prepare_family(args: argparse.Namespace, spec: FamilySpec, accelerator: Accelerator, groups: list,
                    plan: TrainingPlan) -> ModelFamily:  # fmt: skip
    options = LoadOptions(dtype=session.weight_dtype(args), device=accelerator.device,
                          fp8_base=args.fp8_base or args.fp8_base_unet, blocks_to_swap=args.blocks_to_swap or 0,
                          latent_samples=not args.vae_latent_mean,
                          resolutions=tuple(tuple(d.config.resolution) for d in groups[0].datasets))  # fmt: skip
    family = spec.load(args, plan.load_options(args, options))
    for group in groups:
        if group.options.cache_latents:
            group.cache_latents(family.latent_codec, shard=Shard(accelerator.process_index, accelerator.num_processes))
        if group.options.cache_text_encoder_outputs:
            group.cache_text_encoder_outputs(family.text_codec, shard=Shard(accelerator.process_index, accelerator.num_processes))
    if groups[0].options.cache_text_encoder_outputs and not plan.trains_text_encoders and not args.highvram:
        family.offload_text_encoders()  # only sample prompts need them now: keep them off the accelerator
    accelerator.wait_for_everyone()
    if args.gradient_checkpointing or args.cpu_offload_checkpointing:
        enable_block_checkpointing(family.blocks, cpu_offload=args.cpu_offload_checkpointing)
    return family


def _log_summary(args, family: ModelFamily, plan: TrainingPlan, module, group, steps, optimizer_step: OptimizerStep,
                 accelerator) -> None:  # fmt: skip
    memory = [name for name, on in (("fp8 base", args.fp8_base or args.fp8_base_unet),
              (f"{args.blocks_to_swap} blocks swapped", args.blocks_to_swap),
              ("gradient checkpointing" + (" with CPU offload" if args.cpu_offload_checkpointing else ""),
               args.gradient_checkpointing or args.cpu_offload_checkpointing), ("cached latents", args.cache_latents),
              ("cached text encoder outputs", args.cache_text_encoder_outputs)) if on]  # fmt: skip
    logger.info(
        "training %s of %s on %s; %d steps (%d epochs); %d batches per epoch; gradient accumulation %d; "
        "optimizer %s (%s); mixed precision %s; memory: %s",
        plan.describe(module), family.describe(), accelerator.device, steps[0], steps[1], len(group),
        args.gradient_accumulation_steps, optimizer_step.optimizer_name, optimizer_step.describe(),
        args.mixed_precision, ", ".join(memory) or "none",
    )  # fmt: skip
    logger.info("dataset:\n%s", group.summary())


def run_training(args: argparse.Namespace, spec: FamilySpec, plan: TrainingPlan) -> TrainState:
    """Train ``plan`` on ``spec``'s models as the options say; returns the final state."""
    started = time.time()
    spec.check_args(args)
    session.check_common_options(args)
    objective = spec.objective(args)
    plan.check_args(args, spec)
    accelerator = session.make_accelerator(args)
    distributed.check_launch(accelerator.num_processes, blocks_to_swap=args.blocks_to_swap, full_model=plan.full_model)
    kind = plan.step_kind(args, accelerator.num_processes)
    seed = session.resolve_seed(args, started)
    group, held_out = build_dataset_groups(DatasetOptions.from_args(args))
    group.shard(accelerator.num_processes, accelerator.process_index)
    groups = [group] if held_out is None else [group, held_out]
    _check_caching(args, groups)
    if args.debug_dataset:
        for shown in groups:
            show_dataset(shown, Path(args.debug_dataset_dir) if args.debug_dataset_dir else None)
        return TrainState()
    prompts = load_sample_prompts(args.sample_prompts) if args.sample_prompts else []
    if plan.estimates_memory:
        memory_preflight(args, spec, groups, accelerator.device, plan.full_model)
    else:
        args.blocks_to_swap = 0 if args.blocks_to_swap == "auto" else args.blocks_to_swap
    set_seed(seed)
    family = _prepare_family(args, spec, accelerator, groups, plan)
    set_seed(seed)  # the new network's initial weights do not depend on how much caching drew from the stream
    module, param_groups = plan.build(args, family)
    if args.torch_compile:
        compile_blocks(family.blocks, args.dynamo_backend)
    max_steps, num_epochs = session.step_counts(args, len(group))
    group.set_max_train_steps(max_steps)
    optimizer_step = build_optimizer_step(
        kind, param_groups,
        lambda params: build_optimizer(args.optimizer_type or "AdamW", params, args.learning_rate, args.optimizer_args),
        lambda optimizer: session.make_scheduler(args, optimizer, max_steps),
        args.max_grad_norm,
    )  # fmt: skip
    loader = session.prepare_loader(accelerator, session.make_loader(args, group, seed))
    wrapped = distributed.TrainedModules(module, accelerator.device.type)
    prepared = optimizer_step.prepare(accelerator, wrapped, plan.device_placement)
    validation = session.make_validation(args, accelerator, held_out, objective, seed)
    session.init_trackers(args, accelerator, plan.tracker_name)
    bare = accelerator.unwrap_model(prepared).inner
    run = TrainingRun(
        accelerator=accelerator, family=family,
        target=plan.target(bare, prepared, parse_dtype(args.save_precision, "--save_precision")),
        dataset=group, loader=loader, optimizer_step=optimizer_step, objective=objective,
        settings=session.loop_settings(args, max_steps, num_epochs, seed, plan.control_hints),
        naming=CheckpointNaming(Path(args.output_dir), args.output_name),
        metadata=plan.metadata(args, spec, family, groups, optimizer_step.optimizer_name, (max_steps, num_epochs),
                               started, bare, accelerator.num_processes),
        weight_dtype=session.weight_dtype(args), sample_prompts=prompts, sample_dir=Path(args.output_dir) / "sample",
        validation=validation,
    )  # fmt: skip
    _log_summary(args, family, plan, bare, group, (max_steps, num_epochs), optimizer_step, accelerator)
    steps_per_epoch = -(-len(group) // args.gradient_accumulation_steps)
    state = (load_state(run, Path(args.resume)) if args.resume
             else session.initial_state(args, steps_per_epoch, optimizer_step))  # fmt: skip
    state = fit(run, state)
    accelerator.end_training()
    return state
