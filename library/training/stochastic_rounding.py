"""Stochastic rounding of fp32 values into bf16 weights, for optimizer steps that update bf16 weights in fp32."""

from __future__ import annotations

import torch
from torch import Tensor

_LOW_BITS = 1 << 16  # bf16 keeps the high 16 bits of an fp32 bit pattern
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32


def copy_stochastic_(target: Tensor, source: Tensor, generator: torch.Generator | None = None) -> None:
    """Write fp32 ``source`` into bf16 ``target``, rounding each value down or up (away from zero) at random.

    A uniform random integer in [0, 2^16) is added to the fp32 bit pattern and the low 16 bits are cut off: a value
    whose low bits are L rounds away from zero with probability L / 2^16, which is its distance from the bf16 value
    below it over the gap to the next. So E[target] = source, and values bf16 can hold (L = 0) are kept exactly.
    ``source`` stays on its device (the random bits are drawn there, from ``generator`` or torch's default one);
    ``target`` may be on another.
    """
    if target.dtype != torch.bfloat16 or source.dtype != torch.float32:
        raise ValueError(f"stochastic rounding writes float32 into bfloat16, got {source.dtype} -> {target.dtype}")
    bits = torch.randint(0, _LOW_BITS, source.shape, dtype=torch.int32, device=source.device, generator=generator)
    bits.add_(source.contiguous().view(torch.int32)).bitwise_and_(_HIGH_MASK)
    target.copy_(bits.view(torch.float32))
