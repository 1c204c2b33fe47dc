"""Dtype names as users write them on the command line (upstream's spellings)."""

from __future__ import annotations

import torch

from library.errors import UserError

_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2, "float8_e5m2": torch.float8_e5m2,
}  # fmt: skip


def parse_dtype(name: str | None, option: str, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"bf16"`` -> torch.bfloat16; None gives ``default``; an unknown name is a UserError naming the option."""
    if name is None:
        return default
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise UserError(f"{option} {name!r}: unknown dtype; use one of fp32, fp16, bf16, fp8") from None
