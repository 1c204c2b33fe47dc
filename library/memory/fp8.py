"""float8_e4m3fn weight storage for Linear layers, upcast to the activation dtype on the fly.

Attached from outside the model through the shared wrapper chain (``library/memory/wrappers.py``, layer BASE:
innermost, under LoRA): ``enable_fp8_linear`` wraps every Linear whose weight is fp8, ``disable_fp8_linear``
removes it again. Halves the weight memory of bf16 at a small cost in precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from library.memory.wrappers import Layer, attach, detach, is_attached

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_KEY = "fp8_linear"  # the key of the wrapper in each Linear's chain


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def _fp8_linear(module: nn.Linear, inner, x: torch.Tensor) -> torch.Tensor:
    bias = None if module.bias is None else module.bias.to(x.dtype)
    return F.linear(x, module.weight.to(x.dtype), bias)


def enable_fp8_linear(model: nn.Module) -> int:
    """Make every Linear with an fp8 weight compute in its input's dtype; returns how many were newly wrapped."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and is_fp8(module.weight.dtype) and not is_attached(module, FP8_KEY):
            attach(module, Layer.BASE, FP8_KEY, _fp8_linear)
            count += 1
    return count


def disable_fp8_linear(model: nn.Module) -> None:
    for module in model.modules():
        if is_attached(module, FP8_KEY):
            detach(module, FP8_KEY)


def cast_linear_weights_to_fp8(
    model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn, exclude: tuple[str, ...] = ()
) -> int:
    """Store the weights of the Linear layers in ``model`` as fp8 (biases and other tensors keep their dtype).

    Layers whose name ends with one of ``exclude`` keep their dtype (T5's ``wo``: transformers casts the
    activations to that layer's dtype, which must not become fp8)."""
    count = 0
    for name, module in model.named_modules():
        if name.endswith(exclude) and exclude:
            continue
        if isinstance(module, nn.Linear) and not is_fp8(module.weight.dtype):
            module.weight = nn.Parameter(module.weight.data.to(dtype), requires_grad=False)
            count += 1
    return count
