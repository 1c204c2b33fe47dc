"""The one training loop: LoRA/OFT, full fine-tuning and ControlNet, for every model family.

The loop knows nothing model-specific. The family (``FluxFamily``...) turns latents and text into a
prediction and draws sample images; the target (``NetworkTarget``...) owns the trained parameters and
writes the result. Saves, states and samples happen at the step/epoch intervals of ``LoopSettings``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from library.errors import UserError
from library.training import objective
from library.training.checkpoints import CheckpointNaming, atomic_directory, write_json
from library.training.optimizers import optimizer_eval_mode, optimizer_train_mode
from library.training.sample_prompts import SamplePrompt, sample_image_name

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"


class TrainingFamily(Protocol):
    def predict(self, noisy_latents: Tensor, t: Tensor, text: dict[str, Tensor], dtype: torch.dtype) -> Tensor: ...
    def encode_latents(self, images: Tensor) -> Tensor: ...
    def encode_text(self, captions: list[str]) -> dict[str, Tensor]: ...
    def image_seq_len(self, latents: Tensor) -> int: ...
    def sample_image(self, prompt: SamplePrompt, seed: int, dtype: torch.dtype) -> Image.Image: ...


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

    def scale_weight_norms(self, max_norm: float) -> dict[str, float]:
        """Max-norm regularization after an optimizer step; returns what to log (targets without one: {})."""


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
    scale_weight_norms: float | None = None
    masked_loss: bool = False  # conditioning images (R channel) are loss masks, as upstream's --masked_loss


@dataclass
class TrainState:
    """Where training stands; saved beside accelerate's state so a resumed run continues exactly."""

    global_step: int = 0
    epoch: int = 0  # completed epochs
    batches_in_epoch: int = 0  # batches of the current epoch already trained
    losses: list[float] = field(default_factory=list)  # this process's run only; not saved
    last_sample_step: int = -1

    def to_json(self) -> dict[str, int]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    @classmethod
    def from_json(cls, data: dict) -> TrainState:
        return cls(int(data["global_step"]), int(data["epoch"]), int(data["batches_in_epoch"]))


@dataclass
class TrainingRun:
    accelerator: Accelerator
    family: TrainingFamily
    target: TrainingTarget
    dataset: object  # see library/data: set_current_epoch / set_current_step, len(), __getitem__ -> batch
    loader: Iterable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: objective.ObjectiveConfig
    settings: LoopSettings
    naming: CheckpointNaming
    metadata: dict[str, str]
    weight_dtype: torch.dtype
    sample_prompts: list[SamplePrompt] = field(default_factory=list)
    sample_dir: Path | None = None


def batch_loss(run: TrainingRun, batch: dict) -> Tensor:
    """The mean training loss of one batch (latents and text from the caches or encoded now)."""
    device = run.accelerator.device
    latents = (
        batch["latents"].to(device) if batch.get("latents") is not None else run.family.encode_latents(batch["images"])
    )
    latents = latents.float()
    multipliers = batch.get("network_multipliers")
    per_sample = multipliers is not None and bool((multipliers != 1).any())
    run.target.set_batch_multipliers(multipliers.to(device) if per_sample else None)
    try:
        return _batch_loss(run, batch, latents, device)
    finally:
        if per_sample:
            run.target.set_batch_multipliers(None)


def _batch_loss(run: TrainingRun, batch: dict, latents: Tensor, device: torch.device) -> Tensor:
    text = batch.get("text")
    if text is None:
        with torch.set_grad_enabled(run.target.trains_text_encoders):
            text = run.family.encode_text(batch["captions"])
    noise = objective.make_noise(latents, run.objective)
    t = objective.sample_timesteps(
        run.objective, latents.shape[0], image_seq_len=run.family.image_seq_len(latents), device=device
    )
    noisy = objective.noisy_model_input(
        latents, noise, t, ip_noise_gamma=run.objective.ip_noise_gamma,
        ip_noise_gamma_random_strength=run.objective.ip_noise_gamma_random_strength,
    )  # fmt: skip
    with run.accelerator.autocast():
        pred = run.family.predict(noisy, t, text, run.weight_dtype)
    mask = batch.get("alpha_masks")
    if run.settings.masked_loss and batch.get("conditioning_images") is not None:
        mask = batch["conditioning_images"][:, 0] / 2 + 0.5
    per_sample = objective.per_sample_loss(pred, noisy, latents, noise, t, run.objective, mask=mask)
    weights = batch.get("loss_weights")
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


def _due(step_or_epoch: int, every: int | None) -> bool:
    return bool(every) and step_or_epoch % every == 0


def save_model(run: TrainingRun, path: Path, state: TrainState, kind: str, number: int) -> None:
    if not run.accelerator.is_main_process:
        return
    metadata = {}  # --no_metadata: nothing at all
    if run.metadata:
        metadata = dict(run.metadata, ss_steps=str(state.global_step), ss_epoch=str(state.epoch),
                        ss_training_finished_at=str(time.time()))  # fmt: skip
    run.target.save(path, metadata)
    logger.info("saved %s", path)
    s = run.settings
    if kind == "step" and s.save_last_n_steps is not None:  # keep the saves of the last N steps, as upstream
        run.naming.remove_old("step", number, s.save_last_n_steps + 1)
    elif kind == "epoch" and s.save_last_n_epochs is not None:
        run.naming.remove_old("epoch", number, s.save_every_n_epochs * s.save_last_n_epochs)


def save_state(run: TrainingRun, path: Path, state: TrainState) -> None:
    """accelerate's state (model, optimizer, scheduler, RNGs) plus our position, written atomically."""
    run.accelerator.wait_for_everyone()

    def write(folder: Path) -> None:
        run.accelerator.save_state(str(folder))
        if run.accelerator.is_main_process:
            write_json(folder / STATE_FILE, state.to_json())

    if run.accelerator.is_main_process:
        atomic_directory(path, write)
    logger.info("saved state %s", path)


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
    from library.inference.flux_generate import save_png

    optimizer_eval_mode(run.optimizer)
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
        optimizer_train_mode(run.optimizer)
    logger.info("wrote %d sample images to %s", len(paths), run.sample_dir)
    return paths


def _optimizer_step(run: TrainingRun, loss: Tensor) -> None:
    run.accelerator.backward(loss)
    if run.accelerator.sync_gradients and run.settings.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.target.module.parameters(), run.settings.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def _after_step(run: TrainingRun, state: TrainState) -> None:
    s, step = run.settings, state.global_step
    if _due(step, s.sample_every_n_steps):
        sample_images(run, state, None)
    if _due(step, s.save_every_n_steps) and step < s.max_train_steps:
        save_model(run, run.naming.step_file(step), state, "step", step)
        if s.save_state:
            save_state(run, run.naming.step_state(step), state)
            if s.save_last_n_steps_state is not None:
                run.naming.remove_old("step", step, s.save_last_n_steps_state + 1, state=True)


def _after_epoch(run: TrainingRun, state: TrainState) -> None:
    s, epoch = run.settings, state.epoch
    if _due(epoch, s.sample_every_n_epochs):
        sample_images(run, state, epoch)
    if _due(epoch, s.save_every_n_epochs) and epoch < s.num_epochs and state.global_step < s.max_train_steps:
        save_model(run, run.naming.epoch_file(epoch), state, "epoch", epoch)
        if s.save_state:
            save_state(run, run.naming.epoch_state(epoch), state)
            if s.save_last_n_epochs_state is not None:
                run.naming.remove_old("epoch", epoch, s.save_every_n_epochs * s.save_last_n_epochs_state, state=True)


def fit(run: TrainingRun, state: TrainState | None = None) -> TrainState:
    """Train until max_train_steps or num_epochs; returns the final state."""
    state = state or TrainState()
    s = run.settings
    bar = tqdm(
        total=s.max_train_steps, initial=state.global_step, desc="steps", disable=not run.accelerator.is_main_process
    )
    recent: deque[float] = deque(maxlen=20)
    run.target.set_train(True)
    optimizer_train_mode(run.optimizer)
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
            with run.accelerator.accumulate(run.target.module):
                loss = batch_loss(run, batch)
                _optimizer_step(run, loss)
            state.batches_in_epoch = index + 1
            if not run.accelerator.sync_gradients:
                continue
            state.global_step += 1
            value = run.accelerator.gather(loss.detach()).mean().item()
            state.losses.append(value)
            recent.append(value)
            lr = run.scheduler.get_last_lr()[0]
            norms = run.target.scale_weight_norms(s.scale_weight_norms) if s.scale_weight_norms else {}
            bar.update(1)
            bar.set_postfix(avr_loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr:.2e}",
                            **{k.split("/")[-1]: f"{v:g}" for k, v in norms.items() if k.endswith("keys_scaled")})  # fmt: skip
            run.accelerator.log(
                {
                    f"{s.log_prefix}loss/current": value,
                    f"{s.log_prefix}lr/unet": lr,
                    **{f"{s.log_prefix}{k}": v for k, v in norms.items()},
                },
                step=state.global_step,
            )
            _after_step(run, state)
            if state.global_step >= s.max_train_steps:
                break
        if state.batches_in_epoch >= len(run.dataset):
            state.epoch += 1
            state.batches_in_epoch = 0
            _after_epoch(run, state)
    bar.close()
    run.accelerator.wait_for_everyone()
    save_model(run, run.naming.last_file(), state, "last", state.global_step)
    if s.save_state or s.save_state_on_train_end:
        save_state(run, run.naming.last_state(), state)
    if (s.sample_every_n_epochs or s.sample_every_n_steps) and state.last_sample_step != state.global_step:
        sample_images(run, state, state.epoch if s.sample_every_n_epochs else None)
    return state
