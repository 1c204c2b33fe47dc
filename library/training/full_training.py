"""Full fine-tuning (the ``*_train.py`` scripts): the full-model plan for the shared recipe
(``library/training/recipe.py``). The denoiser trains (its last blocks may stay frozen), and the text encoders the
family's options name; the result is written in the layouts users load, trained encoders as files of their own."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from library.data.dataset import add_dataset_args, add_validation_args
from library.errors import UserError
from library.models.text_encoders.saving import text_encoder_path
from library.training import args as training_args
from library.training.family import FamilySpec, LoadOptions, ModelFamily
from library.training.loop import TrainState
from library.training.metadata import full_model_metadata
from library.training.optimizer_step import StepKind, choose_optimizer_step
from library.training.recipe import run_training

logger = logging.getLogger(__name__)


def build_full_parser(spec: FamilySpec, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    rejected = {k: v for k, v in training_args.UNSUPPORTED.items() if k not in training_args.FINETUNE_OPTIONS}
    for add in (
        spec.add_args, spec.add_finetune_args, add_dataset_args, add_validation_args, training_args.add_objective_args,
        training_args.add_optimizer_args, training_args.add_training_args, training_args.add_finetune_args,
        training_args.add_saving_args, training_args.add_validation_loop_args, training_args.add_sample_args,
        training_args.add_logging_args, training_args.add_config_file_args,
    ):  # fmt: skip
        add(parser)
    training_args.add_unsupported_args(parser, {
        **rejected, **training_args.FINETUNE_REJECTED,
        "controlnet_model_name_or_path": "is for ControlNet training, or for LoRA training alongside a ControlNet",
    })  # fmt: skip
    return parser


class TrainedModels(nn.Module):
    """The modules full fine-tuning trains, as one module for accelerate (the family keeps using the same ones)."""

    def __init__(self, denoiser: nn.Module | None, text_encoders: dict[int, nn.Module]):
        super().__init__()
        self.denoiser = denoiser
        self.text_encoders = nn.ModuleDict({str(i): m for i, m in text_encoders.items()})


class FullModelTarget:
    """The family's own models, trained; saved as the files users load."""

    def __init__(self, family: ModelFamily, module: TrainedModels, prepared: nn.Module, save_dtype: torch.dtype | None,
                 mem_eff: bool):  # fmt: skip
        self.family, self.models, self.module = family, module, prepared
        self.trains_text_encoders = len(module.text_encoders) > 0
        self.save_dtype, self.mem_eff = save_dtype, mem_eff

    def set_train(self, train: bool) -> None:
        self.models.train(train)

    def set_batch_multipliers(self, multipliers: torch.Tensor | None) -> None:
        """A dataset's network_multiplier scales a network's output; a full model has none."""

    def scale_weight_norms(self) -> dict[str, float]:
        return {}

    def before_optimizer_step(self) -> None:
        pass

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        raise UserError("diff_output_preservation compares with the base model, which full fine-tuning changes; "
                        "use it with network training")  # fmt: skip
        yield  # pragma: no cover

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """The denoiser at ``path``; each trained text encoder beside it as ``<stem>_<name>.safetensors``."""
        for name, param in self.models.named_parameters():
            if param.requires_grad and not bool(torch.isfinite(param).all()):
                raise UserError(f"not saving {path}: {name} is NaN or infinite; lower the learning rate")
        for swap in self.family.block_swaps:  # swapped blocks' weights may be in flight
            swap.synchronize()
        self.family.save_checkpoint(path, dtype=self.save_dtype, metadata=metadata, mem_eff=self.mem_eff)
        for index in self.models.text_encoders:
            name = self.family.text_encoder_file_names[int(index)]
            self.family.save_text_encoder(int(index), text_encoder_path(path, name), dtype=self.save_dtype,
                                          metadata=metadata, mem_eff=self.mem_eff)  # fmt: skip


class FullModelPlan:
    """The denoiser (and the text encoders the family's options name) trained in full."""

    tracker_name = "finetuning"
    estimates_memory = True
    full_model = True
    control_hints = False
    device_placement = False  # the family loads the trained models onto the device (or swaps their blocks)

    def __init__(self) -> None:
        self.text_lrs: dict[int, float] = {}
        self.mem_eff = False
        self.family: ModelFamily | None = None

    def check_args(self, args: argparse.Namespace, spec: FamilySpec) -> None:
        if args.fp8_base or args.fp8_base_unet:
            raise UserError("--fp8_base stores the base model in fp8, but full fine-tuning trains it; use --full_bf16")
        if args.num_last_block_to_freeze is not None and args.num_last_block_to_freeze < 0:
            raise UserError(f"--num_last_block_to_freeze must be >= 0, got {args.num_last_block_to_freeze}")
        self.text_lrs = spec.finetune_text_encoders(args)
        if not args.learning_rate and not self.text_lrs:
            raise UserError("nothing to train: --learning_rate is 0 and no text encoder trains")

    @property
    def trains_text_encoders(self) -> bool:
        return bool(self.text_lrs)

    def load_options(self, args: argparse.Namespace, options: LoadOptions) -> LoadOptions:
        """Trained weights in fp32 (mixed precision computes in bf16/fp16), or in bf16/fp16 with --full_bf16/fp16."""
        trained = torch.bfloat16 if args.full_bf16 else torch.float16 if args.full_fp16 else torch.float32
        return LoadOptions(**{**vars(options), "denoiser_dtype": trained, "text_encoder_dtype": trained})

    def step_kind(self, args: argparse.Namespace, num_processes: int) -> StepKind:
        return choose_optimizer_step(
            fused_backward_pass=args.fused_backward_pass, blockwise_fused_optimizers=args.blockwise_fused_optimizers,
            optimizer_type=args.optimizer_type, gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision, num_processes=num_processes,
            swaps_trained_blocks=bool(args.blocks_to_swap),
        )  # fmt: skip

    def build(self, args: argparse.Namespace, family: ModelFamily) -> tuple[nn.Module, list[tuple[str, list]]]:
        """The denoiser's parameters by block (blockwise optimizers make one per block, as upstream) and the rest,
        then each trained text encoder at its learning rate."""
        denoiser = family.denoiser if args.learning_rate else None
        groups: list[tuple[str, list]] = []
        if denoiser is not None:
            denoiser.requires_grad_(True)
            frozen = family.blocks[len(family.blocks) - (args.num_last_block_to_freeze or 0) :]
            for block in frozen:
                block.requires_grad_(False)
            if frozen:
                logger.info("the last %d blocks stay frozen (--num_last_block_to_freeze)", len(frozen))
            in_blocks = {id(p) for block in family.blocks for p in block.parameters()}
            for index, block in enumerate(family.blocks):
                trained = [p for p in block.parameters() if p.requires_grad]
                if trained:
                    groups.append((f"block {index}", [{"params": trained, "lr": args.learning_rate}]))
            rest = [p for p in denoiser.parameters() if p.requires_grad and id(p) not in in_blocks]
            groups.append(("other", [{"params": rest, "lr": args.learning_rate}]))
        encoders = {}
        for index, lr in sorted(self.text_lrs.items()):
            encoder = family.text_encoders[index].requires_grad_(True)
            encoders[index] = encoder
            groups.append((family.text_encoder_names[index], [{"params": list(encoder.parameters()), "lr": lr}]))
            logger.info("training %s at learning rate %g", family.text_encoder_names[index], lr)
        self.mem_eff = args.mem_eff_save
        self.family = family
        return TrainedModels(denoiser, encoders), groups

    def target(self, module: nn.Module, prepared: nn.Module, save_dtype: torch.dtype | None) -> FullModelTarget:
        return FullModelTarget(self.family, module, prepared, save_dtype, self.mem_eff)

    def metadata(self, args, spec, family, groups, optimizer_name, steps, started, module, num_processes):
        return full_model_metadata(args, family, groups[0], started)

    def describe(self, module: nn.Module) -> str:
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return f"the full model ({trainable} trainable parameters)"


def run_full_training(args: argparse.Namespace, spec: FamilySpec) -> TrainState:
    return run_training(args, spec, FullModelPlan())
