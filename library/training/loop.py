"""The one training loop: LoRA/OFT, full fine-tuning and ControlNet, for every model family.

The loop knows nothing model-specific. The family (``library/training/family.py`` ``ModelFamily``) turns
latents and text into a prediction and draws sample images; the target (``NetworkTarget``...) owns the trained
parameters and writes the result. Saves, states and samples happen at the step/epoch intervals of ``LoopSettings``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import Tensor
from tqdm import tqdm

from library.errors import UserError
from library.inference.images import save_png
from library.training import objective
from library.training.batch_loss import batch_loss
from library.training.checkpoints import CheckpointNaming, atomic_directory, write_json
from library.training.distributed import check_in_sync
from library.training.family import ModelFamily
from library.training.metadata import saved_metadata
from library.training.optimizer_step import OptimizerStep
from library.training.sample_prompts import SamplePrompt, sample_image_name
from library.training.validation import Validation, validation_loss

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


class TrainingTarget(Protocol):
    """What is trained. ``module`` is the nn.Module passed to accelerate (its parameters are the trained ones)."""

    module: torch.nn.Module
    trains_text_encoders: bool

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write the trained weights to ``path`` atomically, with ``metadata``."""
        ...

    def set_train(self, train: bool) -> None: ...

    def set_batch_multipliers(self, multipliers: Tensor | None) -> None:
        """Per-sample strengths of a network for the next forward (targets without one ignore them)."""

    def scale_weight_norms(self) -> dict[str, float]:
        """Max-norm regularization after an optimizer step, when configured; returns what to log (else {})."""

    def before_optimizer_step(self) -> None:
        """After backward and gradient clipping, once gradients are synced, before the optimizer steps (e.g. GGPO
        reads the gradients' norms here)."""

    def without_adapter(self) -> AbstractContextManager[None]:
        """The base model's own prediction inside the block (differential output preservation); targets that
        are the model itself raise UserError."""


@dataclass(frozen=True)
class LoopSettings:
    max_train_steps: int
    num_epochs: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_steps_state: int | None = None
    save_last_n_epochs_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    seed: int = 0
    log_prefix: str = ""
    masked_loss: bool = False  # conditioning images (R channel) are loss masks, as upstream's --masked_loss
    control_hints: bool = False  # conditioning images are a ControlNet's control hints (never loss masks)
    check_sync: bool = False  # --ddp_check_sync: compare the processes' trained weights after every step


@dataclass
class TrainState:
    """Where training stands; saved beside accelerate's state so a resumed run continues exactly."""

    global_step: int = 0
    epoch: int = 0  # completed epochs
    batches_in_epoch: int = 0  # batches of the current epoch already trained
    losses: list[float] = field(default_factory=list)  # this process's run only; not saved
    last_sample_step: int = -1
    last_saved: Path | None = None  # the last model file written (named when training must stop)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of this run

    def to_json(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(int(data["global_step"]), int(data["epoch"]), int(data["batches_in_epoch"]))


@dataclass
class TrainingRun:
    accelerator: Accelerator
    family: ModelFamily
    target: TrainingTarget
    dataset: object  # see library/data: set_current_epoch / set_current_step, len(), __getitem__ -> batch
    loader: Iterable
    optimizer_step: OptimizerStep  # the optimizers, their schedules and how they step (plain, fused, blockwise)
    objective: objective.ObjectiveConfig
    settings: LoopSettings
    naming: CheckpointNaming
    metadata: dict[str, str]
    weight_dtype: torch.dtype
    sample_prompts: list[SamplePrompt] = field(default_factory=list)
    sample_dir: Path | None = None
    validation: Validation | None = None


def _due(step_or_epoch: int, every: int | None) -> bool:
    return bool(every) and step_or_epoch % every == 0


def save_model(run: TrainingRun, path: Path, state: TrainState, kind: str, number: int) -> None:
    if not run.accelerator.is_main_process:
        return
    metadata = saved_metadata(run.metadata, steps=state.global_step, epoch=state.epoch, finished_at=time.time())
    run.target.save(path, metadata)
    state.last_saved = path
    logger.info("saved %s", path)
    s = run.settings
    if kind == "step" and s.save_last_n_steps is not None:  # keep the saves of the last N steps, as upstream
        run.naming.remove_old("step", number, s.save_last_n_steps + 1)
    elif kind == "epoch" and s.save_last_n_epochs is not None:
        run.naming.remove_old("epoch", number, s.save_every_n_epochs * s.save_last_n_epochs)


def save_state(run: TrainingRun, path: Path, state: TrainState) -> None:
    """accelerate's state (model, optimizer, scheduler, every process's RNGs) plus our position, written atomically:
    every process writes its part into one temporary folder, which the main process renames when all are done."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.num_processes == 1:

        def write(folder: Path) -> None:
            accelerator.save_state(str(folder))
            write_json(folder / STATE_FILE, state.to_json())

        atomic_directory(path, write)
    else:
        tmp = path.with_name(f".{path.name}.partial")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / STATE_FILE, state.to_json())
            atomic_directory(path, lambda folder: _move_contents(tmp, folder))
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
    logger.info("saved state %s", path)


def _move_contents(source: Path, folder: Path) -> None:
    for entry in source.iterdir():
        os.replace(entry, folder / entry.name)


def load_state(run: TrainingRun, path: Path) -> TrainState:
    """Restore a folder written by :func:`save_state`; a missing or foreign folder is a UserError."""
    import json

    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--resume {path}: not a training state folder (no {STATE_FILE}); give a '*-state' folder")
    try:
        state = TrainState.from_json(json.loads(state_file.read_text(encoding="utf-8")))
    except (ValueError, KeyError) as e:
        raise UserError(f"--resume {path}: {STATE_FILE} is damaged ({e})") from None
    run.accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.global_step, state.epoch + 1,
                state.batches_in_epoch)  # fmt: skip
    return state


def sample_images(run: TrainingRun, state: TrainState, epoch: int | None) -> list[Path]:
    if not run.sample_prompts or not run.accelerator.is_main_process:
        return []
    state.last_sample_step = state.global_step

    run.optimizer_step.eval_mode()
    run.target.set_train(False)
    stamp = time.strftime("%Y%m%d%H%M%S")
    paths = []
    rng = torch.get_rng_state()
    try:
        for prompt in run.sample_prompts:
            seed = prompt.seed if prompt.seed is not None else run.settings.seed + prompt.index
            with run.accelerator.autocast():
                image = run.family.sample_image(prompt, seed, run.weight_dtype)
            name = sample_image_name(run.naming.output_name, prompt, epoch=epoch, step=state.global_step, stamp=stamp)
            paths.append(save_png(image, run.sample_dir / name, {"prompt": prompt.prompt, "seed": str(seed)}))
    finally:
        torch.set_rng_state(rng)  # sampling never changes the training's random stream
        run.target.set_train(True)
        run.optimizer_step.train_mode()
    logger.info("wrote %d sample images to %s", len(paths), run.sample_dir)
    return paths


def _after_step(run: TrainingRun, state: TrainState, progress: _Progress) -> None:
    s, step = run.settings, state.global_step
    if run.validation and run.validation.settings.due_after_step(step):
        progress.validated(_validate(run, state, "step", progress))
    if _due(step, s.sample_every_n_steps):
        sample_images(run, state, None)
    if _due(step, s.save_every_n_steps) and step < s.max_train_steps:
        save_model(run, run.naming.step_file(step), state, "step", step)
        if s.save_state:
            save_state(run, run.naming.step_state(step), state)
            if s.save_last_n_steps_state is not None:
                run.naming.remove_old("step", step, s.save_last_n_steps_state + 1, state=True)


def _after_epoch(run: TrainingRun, state: TrainState, progress: _Progress) -> None:
    s, epoch = run.settings, state.epoch
    if run.validation and run.validation.settings.due_after_epoch(epoch):
        progress.validated(_validate(run, state, "epoch", progress))
    if _due(epoch, s.sample_every_n_epochs):
        sample_images(run, state, epoch)
    if _due(epoch, s.save_every_n_epochs) and epoch < s.num_epochs and state.global_step < s.max_train_steps:
        save_model(run, run.naming.epoch_file(epoch), state, "epoch", epoch)
        if s.save_state:
            save_state(run, run.naming.epoch_state(epoch), state)
            if s.save_last_n_epochs_state is not None:
                run.naming.remove_old("epoch", epoch, s.save_every_n_epochs * s.save_last_n_epochs_state, state=True)


def _validate(run: TrainingRun, state: TrainState, kind: str, progress: _Progress) -> float:
    """One validation pass, logged as upstream names it (``loss/validation/{step,epoch}_average`` and the
    divergence from the training loss's moving average)."""
    value = validation_loss(run, run.validation)
    state.validation_losses.append((state.global_step, value))
    prefix = run.settings.log_prefix
    run.accelerator.log({f"{prefix}loss/validation/{kind}_average": value,
                         f"{prefix}loss/validation/{kind}_divergence": value - progress.average},
                        step=state.global_step)  # fmt: skip
    logger.info("validation loss after %s %d: %.5f", kind, state.global_step if kind == "step" else state.epoch, value)
    return value


class _Progress:
    """The progress bar with the moving-average loss, the learning rate and the last validation loss."""

    def __init__(self, run: TrainingRun, state: TrainState):
        s = run.settings
        self.bar = tqdm(total=s.max_train_steps, initial=state.global_step, desc="steps",
                        disable=not run.accelerator.is_main_process)  # fmt: skip
        self.recent: deque[float] = deque(maxlen=20)
        self.fields: dict[str, str] = {}

    @property
    def average(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def stepped(self, loss: float, lr: float, norms: dict[str, float]) -> None:
        self.recent.append(loss)
        self.fields.update(avr_loss=f"{self.average:.4f}", lr=f"{lr:.2e}")
        self.fields.update({k.split("/")[-1]: f"{v:g}" for k, v in norms.items() if k.endswith("keys_scaled")})
        self.bar.update(1)
        self.bar.set_postfix(self.fields)

    def validated(self, loss: float) -> None:
        self.fields["val_loss"] = f"{loss:.4f}"
        self.bar.set_postfix(self.fields)


def _check_finite(value: float, state: TrainState) -> None:
    """A NaN or infinite loss stops the run before anything non-finite is saved (upstream trains on)."""
    if not math.isfinite(value):
        last = state.last_saved or "none (nothing was saved in this run)"
        raise UserError(f"the loss became {value} at step {state.global_step}; training stopped so that no "
                        f"non-finite weights are saved. The last good saved file: {last}")  # fmt: skip


def fit(run: TrainingRun, state: TrainState | None = None) -> TrainState:
    """Train until max_train_steps or num_epochs; returns the final state."""
    state = state or TrainState()
    s = run.settings
    progress = _Progress(run, state)
    run.target.set_train(True)
    run.optimizer_step.train_mode()
    if s.sample_at_first and state.global_step == 0:
        sample_images(run, state, None)
    if len(run.dataset) == 0:
        raise UserError("the dataset yields no batches; check the image folders and batch sizes")
    while state.epoch < s.num_epochs and state.global_step < s.max_train_steps:
        run.dataset.set_current_epoch(state.epoch + 1)
        for index, batch in enumerate(run.loader):
            if index < state.batches_in_epoch:
                continue  # resuming inside an epoch: the same order, already trained
            run.dataset.set_current_step(state.global_step)
            for swap in run.family.block_swaps:
                swap.prepare_for_training()
            with run.accelerator.accumulate(run.target.module):
                # through the prepared module's forward: with DDP its reducer then averages the gradients in backward
                loss = run.target.module(lambda batch=batch: batch_loss(run, batch))
                run.optimizer_step.step(run.accelerator, loss, run.target.before_optimizer_step)
            state.batches_in_epoch = index + 1
            if not run.accelerator.sync_gradients:
                continue
            state.global_step += 1
            value = run.accelerator.gather(loss.detach()).mean().item()
            _check_finite(value, state)
            state.losses.append(value)
            lr = run.optimizer_step.lr
            norms = run.target.scale_weight_norms()
            if s.check_sync and run.accelerator.num_processes > 1:
                check_in_sync(run.accelerator, run.target.module, state.global_step)
            progress.stepped(value, lr, norms)
            run.accelerator.log({f"{s.log_prefix}loss/current": value, f"{s.log_prefix}lr/unet": lr,
                                 **{f"{s.log_prefix}{k}": v for k, v in norms.items()}}, step=state.global_step)  # fmt: skip
            _after_step(run, state, progress)
            if state.global_step >= s.max_train_steps:
                break
        if state.batches_in_epoch >= len(run.loader):  # this process's batches per epoch
            state.epoch += 1
            state.batches_in_epoch = 0
            _after_epoch(run, state, progress)
    progress.bar.close()
    run.accelerator.wait_for_everyone()
    save_model(run, run.naming.last_file(), state, "last", state.global_step)
    if s.save_state or s.save_state_on_train_end:
        save_state(run, run.naming.last_state(), state)
    if (s.sample_every_n_epochs or s.sample_every_n_steps) and state.last_sample_step != state.global_step:
        sample_images(run, state, state.epoch if s.sample_every_n_epochs else None)
    return state
