"""The rectified-flow training objective: timestep sampling, noise, noisy input, target, weighting and loss.

Convention: ``noisy = (1 - t) * x0 + t * noise`` with ``t`` in [0, 1] (1 is pure noise); the model predicts the
velocity ``noise - x0``. Each family gives its denoiser ``t`` on its own scale. See docs/objective.md.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from library.errors import UserError
from library.models.flow_shift import resolution_mu, time_shift

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000
TIMESTEP_SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "density_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)
MIN_WEIGHTING_T = 1.0 / NUM_TRAIN_TIMESTEPS


@dataclass(frozen=True)
class ObjectiveConfig:
    """Upstream's objective options (same names and defaults)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    weighting_scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    def __post_init__(self) -> None:
        _check_choice("--timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _check_choice("--model_prediction_type", self.model_prediction_type, PREDICTION_TYPES)
        _check_choice("--weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        _check_choice("--loss_type", self.loss_type, LOSS_TYPES)
        _check_choice("--huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        _check_positive("--sigmoid_scale", self.sigmoid_scale)
        _check_positive("--discrete_flow_shift", self.discrete_flow_shift)
        _check_positive("--logit_std", self.logit_std)
        if self.weighting_scheme == "mode" and not -1.0 <= self.mode_scale <= MODE_SCALE_MAX:
            raise UserError(
                f"--mode_scale must be in [-1, {MODE_SCALE_MAX:.4f}] to give a density, got {self.mode_scale}"
            )
        if self.loss_type in ("huber", "smooth_l1"):
            _check_positive("--huber_c", self.huber_c)
            _check_positive("--huber_scale", self.huber_scale)
        for option, value in (("--ip_noise_gamma", self.ip_noise_gamma), ("--noise_offset", self.noise_offset)):
            if value is not None and value < 0:
                raise UserError(f"{option} must be >= 0, got {value}")
        self._check_timestep_range()
        self._warn_ignored()

    def _check_timestep_range(self) -> None:
        if self.min_timestep is not None and not 0 <= self.min_timestep < NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--min_timestep must be in 0..999, got {self.min_timestep}")
        if self.max_timestep is not None and not 0 < self.max_timestep <= NUM_TRAIN_TIMESTEPS:
            raise UserError(f"--max_timestep must be in 1..1000, got {self.max_timestep}")
        if self.timestep_range[0] > self.timestep_range[1]:
            raise UserError(
                f"--min_timestep ({self.min_timestep}) must not exceed --max_timestep ({self.max_timestep})"
            )

    def _warn_ignored(self) -> None:
        if self.weighting_scheme in ("sigma_sqrt", "cosmap") and self.model_prediction_type != "sigma_scaled":
            logger.warning(
                "--weighting_scheme %s only weights the loss with --model_prediction_type sigma_scaled; ignored",
                self.weighting_scheme,
            )
        if self.weighting_scheme in ("logit_normal", "mode") and self.timestep_sampling not in ("sigma", "density_shift"):
            logger.warning(
                "--weighting_scheme %s only shapes --timestep_sampling sigma; ignored", self.weighting_scheme
            )

    @property
    def timestep_range(self) -> tuple[float, float]:
        """(low, high) bounds of t from --min_timestep/--max_timestep, as fractions of 1000."""
        low = 0 if self.min_timestep is None else self.min_timestep
        high = NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep
        return low / NUM_TRAIN_TIMESTEPS, high / NUM_TRAIN_TIMESTEPS


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{option} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(option: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{option} must be > 0, got {value}")


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Standard normal float32 samples drawn on the generator's device, then moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """The discrete flow shift: ``t' = s t / (1 + (s - 1) t)``."""
    return shift * t / (1 + (shift - 1) * t)


def timestep_density_sample(cfg: ObjectiveConfig, batch_size: int, generator: torch.Generator | None) -> Tensor:
    """u in [0, 1] from the density for ``weighting_scheme`` (logit_normal, mode, otherwise uniform)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * _randn((batch_size,), generator, "cpu"))
    u = _rand((batch_size,), generator, "cpu")
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def discrete_sigmas(shift: float) -> Tensor:
    """The flow-matching Euler discrete scheduler's 1000 training sigmas, from 1 down to shift(0.001)."""
    t = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    return shift_timesteps(t, shift)


def sample_timesteps(
    cfg: ObjectiveConfig,
    batch_size: int,
    *,
    image_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """t in [0, 1] of shape [batch_size] for ``cfg.timestep_sampling``, mapped into --min/--max_timestep.

    ``image_seq_len`` (packed image tokens, (H/2)(W/2) of the latent) is needed by flux_shift only. density_shift
    is upstream's rectified-flow script sampling: u from the weighting_scheme density, ``t = shift(u)`` with
    discrete_flow_shift, continuous (upstream floors 1000 t to an integer, so t = 0 can occur there).
    """
    mode = cfg.timestep_sampling
    if mode == "density_shift":
        t = shift_timesteps(timestep_density_sample(cfg, batch_size, generator), cfg.discrete_flow_shift)
    elif mode == "uniform":
        t = _rand((batch_size,), generator, "cpu")
    elif mode == "sigma":
        u = timestep_density_sample(cfg, batch_size, generator)
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        t = discrete_sigmas(cfg.discrete_flow_shift)[indices]
    else:
        t = torch.sigmoid(cfg.sigmoid_scale * _randn((batch_size,), generator, "cpu"))
        if mode == "shift":
            t = shift_timesteps(t, cfg.discrete_flow_shift)
        elif mode == "flux_shift":
            if image_seq_len is None:
                raise ValueError("timestep_sampling flux_shift needs image_seq_len")
            t = time_shift(resolution_mu(image_seq_len), 1.0, t)
    low, high = cfg.timestep_range
    if (low, high) != (0.0, 1.0):
        t = low + (high - low) * t
    return t.to(device)


def _per_sample(values: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape a [B] tensor to [B, 1, ...] so it broadcasts over ``like``; floats pass through."""
    if isinstance(values, Tensor):
        return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)
    return values


def _strength(value: float, random_strength: bool, generator: torch.Generator | None) -> float:
    """``value``, or ``value`` times one uniform draw when random strength is on (upstream's rule)."""
    return value * _rand((1,), generator, "cpu").item() if random_strength else value


def make_noise(latents: Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise like ``latents`` plus the per-channel --noise_offset term ``offset * N(0, 1)[B, C, 1, 1]``."""
    noise = _randn(tuple(latents.shape), generator, latents.device)
    if cfg.noise_offset:
        offset = _strength(cfg.noise_offset, cfg.noise_offset_random_strength, generator)
        channel_shape = (latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2)
        noise = noise + offset * _randn(channel_shape, generator, latents.device)
    return noise.to(latents.dtype)


def noisy_model_input(
    latents: Tensor,
    noise: Tensor,
    t: Tensor,
    *,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``(1 - t) x0 + t (noise + gamma xi)``; the input perturbation ``gamma xi`` is left out of the target."""
    t = _per_sample(t, latents)
    if ip_noise_gamma:
        gamma = _strength(ip_noise_gamma, ip_noise_gamma_random_strength, generator)
        noise = noise + gamma * _randn(tuple(latents.shape), generator, latents.device).to(noise.dtype)
    return ((1 - t) * latents + t * noise).to(latents.dtype)


def velocity_target(latents: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity ``noise - x0``."""
    return noise - latents


def training_target(latents: Tensor, noise: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """What :func:`apply_model_prediction_type`'s output is compared with: x0 for sigma_scaled, else velocity."""
    if cfg.model_prediction_type == "sigma_scaled":
        return latents
    return velocity_target(latents, noise)


def loss_weighting(cfg: ObjectiveConfig, t: Tensor) -> Tensor:
    """The rectified-flow loss weights: sigma_sqrt ``t^-2`` (t clamped to >= 0.001), cosmap ``2 / (pi (1 - 2t + 2t^2))``, else 1."""
    t = t.float()
    if cfg.weighting_scheme == "sigma_sqrt":
        return t.clamp(min=MIN_WEIGHTING_T) ** -2.0
    if cfg.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    return torch.ones_like(t)


def apply_model_prediction_type(
    pred: Tensor, noisy: Tensor, t: Tensor, cfg: ObjectiveConfig
) -> tuple[Tensor, Tensor | None]:
    """Turn the model's output into what the loss compares with :func:`training_target`, plus per-sample weights.

    raw: the velocity as predicted; additive: ``pred + noisy``; sigma_scaled: the x0 estimate ``noisy - t pred``,
    weighted by :func:`loss_weighting` (shaped [B, 1, ...]).
    """
    if cfg.model_prediction_type == "raw":
        return pred, None
    if cfg.model_prediction_type == "additive":
        return pred + noisy, None
    x0_estimate = noisy - _per_sample(t, pred) * pred
    return x0_estimate, _per_sample(loss_weighting(cfg, t), pred)


def huber_c_for(cfg: ObjectiveConfig, t: Tensor) -> Tensor | None:
    """Per-sample Huber threshold [B] for huber/smooth_l1 losses, None for l1/l2.

    constant: ``c * scale``; exponential: ``c^t * scale`` (upstream's ``exp(-alpha * 1000 t)``);
    snr: ``c + (1 - c) (1 - t)^2``, upstream's ``(1 - c) / (1 + sigma)^2 + c`` with the flow noise-to-signal ratio
    ``sigma = t / (1 - t)`` (so ``snr = ((1 - t) / t)^2``); finite for every t in [0, 1].
    """
    if cfg.loss_type not in ("huber", "smooth_l1"):
        return None
    t = t.float()
    if cfg.huber_schedule == "constant":
        return torch.full_like(t, cfg.huber_c * cfg.huber_scale)
    if cfg.huber_schedule == "exponential":
        return torch.exp(math.log(cfg.huber_c) * t) * cfg.huber_scale
    return cfg.huber_c + (1 - cfg.huber_c) * (1 - t) ** 2


def conditional_loss(
    pred: Tensor, target: Tensor, loss_type: str, huber_c: Tensor | float | None = None, reduction: str = "none"
) -> Tensor:
    """Element-wise l2/l1 or upstream's pseudo-Huber losses, reduced by ``reduction`` (none, mean or sum).

    huber: ``2 c (sqrt((a - b)^2 + c^2) - c)``; smooth_l1: ``2 (sqrt((a - b)^2 + c^2) - c)``, c per sample.
    """
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = _per_sample(huber_c, pred)
        loss = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
        if loss_type == "huber":
            loss = c * loss
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def masked_mean_loss(loss: Tensor, mask: Tensor | None = None, weighting: Tensor | None = None) -> Tensor:
    """Per-sample loss [B]: ``mean(loss * weighting * mask)`` over all non-batch elements, as upstream.

    ``mask`` is [B, H, W] or [B, 1, H, W] in [0, 1] at any resolution; it is area-resized to the loss's spatial
    size. Unmasked elements count as zeros in the mean (upstream's masked loss), they are not dropped.
    """
    if weighting is not None:
        loss = loss * weighting
    if mask is not None:
        if mask.ndim == loss.ndim - 1:
            mask = mask.unsqueeze(1)
        mask = F.interpolate(mask.to(device=loss.device, dtype=loss.dtype), size=loss.shape[2:], mode="area")
        loss = loss * mask
    return loss.mean(dim=tuple(range(1, loss.ndim)))


def per_sample_loss(
    pred: Tensor,
    noisy: Tensor,
    latents: Tensor,
    noise: Tensor,
    t: Tensor,
    cfg: ObjectiveConfig,
    mask: Tensor | None = None,
    target: Tensor | None = None,
) -> Tensor:
    """The whole objective for one batch in float32: prediction type, target, loss type, weighting and mask -> [B].

    ``target`` replaces :func:`training_target` (e.g. a prior prediction passed through
    :func:`apply_model_prediction_type`, for differential output preservation)."""
    pred, weighting = apply_model_prediction_type(pred.float(), noisy.float(), t, cfg)
    target = training_target(latents.float(), noise.float(), cfg) if target is None else target.float()
    loss = conditional_loss(pred, target, cfg.loss_type, huber_c_for(cfg, t))
    return masked_mean_loss(loss, mask, weighting)
