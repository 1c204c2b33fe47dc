"""ControlNet training (the ``*_train_control_net.py`` script): the ControlNet plan for the shared recipe
(``library/training/recipe.py``). The base model stays frozen (fp8, block swap and cached outputs as in the other
recipes); the ControlNet trains on each image's conditioning image as its control hint and is saved alone, in the
layout other tools load, with modelspec metadata."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from library.data.dataset import add_controlnet_dataset_args, add_dataset_args, add_validation_args
from library.errors import UserError
from library.training import args as training_args
from library.training.family import FamilySpec, LoadOptions, ModelFamily
from library.training.loop import TrainState
from library.training.metadata import controlnet_metadata
from library.training.optimizer_step import StepKind, choose_optimizer_step
from library.training.recipe import run_training

logger = logging.getLogger(__name__)


def build_controlnet_parser(spec: FamilySpec, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    own = {*training_args.FINETUNE_OPTIONS, "conditioning_data_dir", "controlnet_model_name_or_path"}
    rejected = {k: v for k, v in training_args.UNSUPPORTED.items() if k not in own}
    for add in (
        spec.add_args, add_dataset_args, add_validation_args, add_controlnet_dataset_args,
        training_args.add_objective_args, training_args.add_optimizer_args, training_args.add_training_args,
        training_args.add_finetune_args, training_args.add_controlnet_args, training_args.add_saving_args,
        training_args.add_validation_loop_args, training_args.add_sample_args, training_args.add_logging_args,
        training_args.add_config_file_args,
    ):  # fmt: skip
        add(parser)
    training_args.add_unsupported_args(parser, {**rejected, **training_args.FINETUNE_REJECTED})
    return parser


class ControlNetTarget:
    """A ControlNet trained on a frozen base model, saved alone."""

    trains_text_encoders = False

    def __init__(self, family: ModelFamily, controlnet: nn.Module, prepared: nn.Module, save_dtype: torch.dtype | None,
                 mem_eff: bool):  # fmt: skip
        self.family, self.controlnet, self.module = family, controlnet, prepared
        self.save_dtype, self.mem_eff = save_dtype, mem_eff

    def set_train(self, train: bool) -> None:
        self.controlnet.train(train)

    def set_batch_multipliers(self, multipliers: torch.Tensor | None) -> None:
        """A dataset's network_multiplier scales a network's output; a ControlNet has none."""

    def scale_weight_norms(self) -> dict[str, float]:
        return {}

    def before_optimizer_step(self) -> None:
        pass

    def without_adapter(self):
        raise UserError("diff_output_preservation is for network training")

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        for name, param in self.controlnet.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise UserError(f"not saving {path}: {name} is NaN or infinite; lower the learning rate")
        self.family.save_controlnet(path, dtype=self.save_dtype, metadata=metadata, mem_eff=self.mem_eff)


class ControlNetPlan:
    """A new ControlNet (or --controlnet_model_name_or_path, continued) trained on the frozen base model."""

    tracker_name = "controlnet_train"
    estimates_memory = False  # the pre-flight does not model a ControlNet yet
    full_model = False
    control_hints = True
    device_placement = True
    trains_text_encoders = False

    def __init__(self) -> None:
        self.spec: FamilySpec | None = None
        self.family: ModelFamily | None = None
        self.mem_eff = False

    def check_args(self, args: argparse.Namespace, spec: FamilySpec) -> None:
        if args.controlnet_depth < 1:
            raise UserError(f"--controlnet_depth must be at least 1, got {args.controlnet_depth}")
        if args.num_last_block_to_freeze:
            raise UserError("--num_last_block_to_freeze freezes the base model's blocks, which are frozen already")
        self.spec, self.mem_eff = spec, args.mem_eff_save

    def step_kind(self, args: argparse.Namespace, num_processes: int) -> StepKind:
        return choose_optimizer_step(
            fused_backward_pass=args.fused_backward_pass, blockwise_fused_optimizers=args.blockwise_fused_optimizers,
            optimizer_type=args.optimizer_type, gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision, num_processes=num_processes,
        )  # fmt: skip

    def load_options(self, args: argparse.Namespace, options: LoadOptions) -> LoadOptions:
        return options

    def build(self, args: argparse.Namespace, family: ModelFamily) -> tuple[nn.Module, list[tuple[str, list]]]:
        """The ControlNet in fp32 (or --full_bf16/--full_fp16), by block for blockwise optimizers."""
        controlnet = self.spec.make_controlnet(args, family, trained=True)
        if args.full_bf16 or args.full_fp16:
            controlnet.to(torch.bfloat16 if args.full_bf16 else torch.float16)
        family.attach_controlnet(controlnet)
        self.family = family
        for param in getattr(controlnet, "unused_parameters", list)():
            param.requires_grad_(False)  # never gets a gradient (see the ControlNet's unused_parameters)
        blocks = list(getattr(controlnet, "double_blocks", []))
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        groups = [(f"block {i}", [{"params": [p for p in b.parameters() if p.requires_grad], "lr": args.learning_rate}])
                  for i, b in enumerate(blocks)]  # fmt: skip
        rest = [p for p in controlnet.parameters() if id(p) not in in_blocks and p.requires_grad]
        groups.append(("other", [{"params": rest, "lr": args.learning_rate}]))
        return controlnet, groups

    def target(self, module: nn.Module, prepared: nn.Module, save_dtype: torch.dtype | None) -> ControlNetTarget:
        return ControlNetTarget(self.family, module, prepared, save_dtype, self.mem_eff)

    def metadata(self, args, spec, family, groups, optimizer_name, steps, started, module, num_processes):
        return controlnet_metadata(args, family, started)

    def describe(self, module: nn.Module) -> str:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return f"a ControlNet ({trainable} trainable parameters)"


def run_controlnet_training(args: argparse.Namespace, spec: FamilySpec) -> TrainState:
    return run_training(args, spec, ControlNetPlan())
