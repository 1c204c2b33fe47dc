"""The loss of one batch: latents and text (from the caches or encoded now), noise, timesteps, the family's
prediction and the objective, with loss masks, per-sample weights and differential output preservation.

Training draws each sample's noise and timestep from its own random stream, keyed by (seed, epoch, global batch,
position in the global batch): the same sample gets the same noise whichever process computes it and however the
global batch is split, so N processes with batch size b train exactly as one process with batch size N*b, and a
resumed run continues with the same noise. Validation passes fixed timesteps and its own generator so that its curve
is comparable across steps and runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from library.random_streams import keyed_generator
from library.training import objective
from library.training.family import ModelInput

if TYPE_CHECKING:
    from library.training.loop import TrainingRun


def batch_loss(
    run: TrainingRun,
    batch: dict,
    *,
    fixed_t: float | None = None,
    generator: torch.Generator | None = None,
    training: bool = True,
) -> Tensor:
    """The mean loss of ``batch``. ``fixed_t`` gives every sample that time instead of a sampled one;
    ``training=False`` turns off the family's augmentations and never builds a graph through the encoders."""
    device = run.accelerator.device
    latents = (
        batch["latents"].to(device) if batch.get("latents") is not None
        else run.family.encode_latents(batch["images"], _posterior_keys(run, batch))
    )
    latents = run.family.to_model_latents(latents.float())
    multipliers = batch.get("network_multipliers")
    per_sample = multipliers is not None and bool((multipliers != 1).any())
    run.target.set_batch_multipliers(multipliers.to(device) if per_sample else None)
    try:
        return _loss(run, batch, latents, fixed_t, generator, training)
    finally:
        if per_sample:
            run.target.set_batch_multipliers(None)


def _loss(run: TrainingRun, batch: dict, latents: Tensor, fixed_t: float | None, generator: torch.Generator | None,
          training: bool) -> Tensor:  # fmt: skip
    cfg = run.objective
    text = batch.get("text")
    if text is None or run.target.trains_text_encoders:  # cached text with a text-encoder LoRA: partial caching
        with torch.set_grad_enabled(training and run.target.trains_text_encoders):
            text = run.family.encode_text(batch["captions"], cached=text)
    if training:
        text = run.family.augment_text(text)
    keys = batch.get("sample_keys") if generator is None and fixed_t is None else None
    if keys is not None:
        parts = [_noisy_input(run, latents[j : j + 1], None, sample_generator(run.settings.seed, key))
                 for j, key in enumerate(keys)]  # fmt: skip
        noise, t, noisy = (torch.cat(part) for part in zip(*parts))
    else:
        noise, t, noisy = _noisy_input(run, latents, fixed_t, generator)
    hints = batch.get("conditioning_images") if run.settings.control_hints else None
    inputs = ModelInput(noisy, t, text, control=hints, augment=training)
    with run.accelerator.autocast():
        pred = run.family.predict(inputs, run.weight_dtype)
    mask = batch.get("alpha_masks")
    if run.settings.masked_loss and not run.settings.control_hints and batch.get("conditioning_images") is not None:
        mask = batch["conditioning_images"][:, 0] / 2 + 0.5
    target = _preservation_target(run, batch, inputs, latents, noise)
    per_sample = objective.per_sample_loss(pred, noisy, latents, noise, t, cfg, mask=mask, target=target)
    weights = batch.get("loss_weights")
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, per_sample.dtype)
    denominator = batch.get("loss_denominator")  # this process's share of a global batch (see DatasetGroup.shard)
    return per_sample.mean() if denominator is None else per_sample.sum() / denominator


def _posterior_keys(run: TrainingRun, batch: dict) -> list[tuple] | None:
    """Keys of the posterior draws of images encoded now (each sample's own stream; None: the global stream)."""
    keys = batch.get("sample_keys")
    return None if keys is None else [(run.settings.seed, "posterior", *key) for key in keys]


def sample_generator(seed: int, key: tuple) -> torch.Generator:
    """The random stream of one training sample, from the run's seed and the sample's (epoch, batch, position)."""
    return keyed_generator(seed, *key)


def _noisy_input(run: TrainingRun, latents: Tensor, fixed_t: float | None,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(noise, timesteps, noisy latents) for ``latents``, drawn from ``generator`` (None: the global stream)."""
    cfg, device = run.objective, latents.device
    noise = objective.make_noise(latents, cfg, generator)
    if fixed_t is None:
        t = objective.sample_timesteps(cfg, latents.shape[0], image_seq_len=run.family.image_seq_len(latents),
                                       generator=generator, device=device)  # fmt: skip
    else:
        t = torch.full((latents.shape[0],), fixed_t, device=device)
    noisy = objective.noisy_model_input(
        latents, noise, t, ip_noise_gamma=cfg.ip_noise_gamma,
        ip_noise_gamma_random_strength=cfg.ip_noise_gamma_random_strength, generator=generator,
    )  # fmt: skip
    return noise, t, noisy


def _preservation_target(run: TrainingRun, batch: dict, inputs: ModelInput, latents: Tensor,
                         noise: Tensor) -> Tensor | None:  # fmt: skip
    """Differential output preservation (a subset's ``custom_attributes.diff_output_preservation``), as upstream:
    for the marked samples the target is the base model's own prediction (the adapter switched off) on the same
    input, so the adapter learns to leave those prompts' outputs unchanged. None when no sample is marked."""
    flags = batch.get("diff_output_preservation")
    if flags is None or not bool(flags.any()):
        return None
    rows = flags.to(torch.bool).nonzero().flatten().to(latents.device)
    control = None if inputs.control is None else inputs.control[rows.to(inputs.control.device)]
    prior_inputs = ModelInput(inputs.noisy_latents[rows], inputs.timesteps[rows],
                              {k: v[rows.to(v.device)] for k, v in inputs.text.items()}, control, augment=False)  # fmt: skip
    with torch.no_grad(), run.target.without_adapter(), run.accelerator.autocast():
        prior = run.family.predict(prior_inputs, run.weight_dtype)
    cfg = run.objective
    target = objective.training_target(latents.float(), noise.float(), cfg).clone()
    prior_target, _ = objective.apply_model_prediction_type(
        prior.float(), prior_inputs.noisy_latents.float(), prior_inputs.timesteps, cfg
    )
    target[rows] = prior_target
    return target
