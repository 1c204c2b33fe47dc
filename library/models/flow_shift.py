"""Resolution-dependent timestep shift of rectified-flow schedules (FLUX.1 dev's sampling schedule, and the
``flux_shift`` training sampling): ``t' = e^mu / (e^mu + (1/t - 1)^sigma)`` with ``mu`` linear in image tokens."""

from __future__ import annotations

import math

from torch import Tensor


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def resolution_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The shift ``mu``, linear in the number of image tokens from 256 (base) to 4096 (max)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * image_seq_len + (base_shift - slope * 256)
