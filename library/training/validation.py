"""Validation loss on held-out images (``validation_split``), as upstream's current trainer computes it: every
validation batch at a few fixed timesteps spread over the training range, with noise from a generator seeded by
``validation_seed``, so the curve is comparable across steps and across runs. The training's random streams,
the network's train mode and schedule-free optimizers' modes are left as they were."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from library.training.batch_loss import batch_loss
from library.training.objective import NUM_TRAIN_TIMESTEPS, ObjectiveConfig

if TYPE_CHECKING:
    from library.training.loop import TrainingRun

NUM_VALIDATION_TIMESTEPS = 4  # upstream's: 200, 400, 600, 800 over the full range


def validation_timesteps(cfg: ObjectiveConfig, count: int = NUM_VALIDATION_TIMESTEPS) -> tuple[float, ...]:
    """``count`` times t in (0, 1), evenly inside --min_timestep..--max_timestep, as upstream picks them
    (integer timesteps of ``linspace(min, max, count + 2)`` without the ends)."""
    low, high = (round(v * NUM_TRAIN_TIMESTEPS) for v in cfg.timestep_range)
    steps = np.linspace(low, high, count + 2, dtype=int)[1:-1]
    return tuple(float(s) / NUM_TRAIN_TIMESTEPS for s in steps)


@dataclass(frozen=True)
class ValidationSettings:
    seed: int
    timesteps: tuple[float, ...]
    every_n_steps: int | None = None
    every_n_epochs: int | None = None  # None: every epoch, as upstream does when there is validation data
    max_steps: int | None = None  # validation batches per pass; None: all

    def due_after_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        return self.every_n_epochs is None or epoch % self.every_n_epochs == 0


@dataclass
class Validation:
    settings: ValidationSettings
    loader: Iterable  # batches of the validation group, the same every pass

    def __len__(self) -> int:
        batches = len(self.loader)
        return batches if self.settings.max_steps is None else min(batches, self.settings.max_steps)


def validation_loss(run: TrainingRun, validation: Validation) -> float:
    """The mean loss over the validation batches and fixed timesteps (all processes averaged)."""
    settings = validation.settings
    generator = torch.Generator().manual_seed(settings.seed)
    rng = torch.get_rng_state()
    run.target.set_train(False)
    run.optimizer_step.eval_mode()
    total, count = 0.0, 0
    bar = tqdm(total=len(validation) * len(settings.timesteps), desc="validation", leave=False,
               disable=not run.accelerator.is_main_process)  # fmt: skip
    try:
        with torch.no_grad():
            for index, batch in enumerate(validation.loader):
                if index >= len(validation):
                    break
                for t in settings.timesteps:
                    loss = batch_loss(run, batch, fixed_t=t, generator=generator, training=False)
                    total += run.accelerator.gather(loss.detach()).mean().item()
                    count += 1
                    bar.update(1)
    finally:
        bar.close()
        torch.set_rng_state(rng)
        run.target.set_train(True)
        run.optimizer_step.train_mode()
    return total / max(count, 1)
