"""Optimizer memory from each optimizer's own state layout (what ``optimizer.state`` holds after the first step)
and the working memory of one step, per trained parameter: its shape, dtype and whether it starts at zero.

Layouts (n elements, s bytes per element of the parameter's dtype):

- AdamW (torch): exp_avg + exp_avg_sq in the parameter's dtype (+ max_exp_avg_sq with amsgrad), an fp32 step
  scalar. A step with ``foreach`` (the default on CUDA) makes one temporary list as large as all the states'
  exp_avg_sq; without, two temporaries of the largest parameter.
- bitsandbytes 8-bit (AdamW8bit, PagedAdamW8bit, Lion8bit, SGDNesterov8bit): uint8 states plus an fp32 absmax per
  256 elements for parameters of at least ``min_8bit_size`` (4096) elements, fp32 states below; two 256-entry fp32
  quantization maps per optimizer (one for one-state optimizers). 32-bit paged AdamW: fp32 states.
- Adafactor (transformers): fp32 row and column second moments for parameters of two or more dims, a full fp32
  second moment below, a full fp32 first moment with ``beta1``, an fp32 RMS scalar. A step works on one parameter
  at a time: two fp32 temporaries of it and its row and column factors, plus fp32 copies of a bf16/fp16 parameter
  and gradient.
- Lion: exp_avg; a step clones it twice per parameter. SGD(Nesterov): a momentum buffer, updated in place. Prodigy: exp_avg, exp_avg_sq, ``s`` and ``p0`` (every ``slice_p``-th element; one element for
  a parameter that starts at zero, as LoRA's up weights). Schedule-free AdamW/RAdam: z + exp_avg_sq; SGD: z.

Any other optimizer is assumed to keep two states like AdamW, and its step's working memory is not modelled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from library.training.optimizers import parse_key_value_args

BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
QMAP_BYTES = 256 * 4


@dataclass(frozen=True)
class TrainedParam:
    shape: tuple[int, ...]
    dtype: torch.dtype
    starts_at_zero: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class OptimizerMemory:
    """``state``: bytes of the optimizer's state; ``step``: most bytes one step allocates beyond it and the
    gradients; ``rule``: the layout, for the summary; ``known``: False when the layout is assumed."""

    state: int
    step: int
    rule: str
    known: bool = True


def _key(optimizer_type: str) -> str:
    name = (optimizer_type or "AdamW").lower()
    return name.rpartition(".")[2] if "." in name else name


def _bnb(params: Sequence[TrainedParam], states: int, min_size: int) -> int:
    total = states * QMAP_BYTES if any(p.numel >= min_size for p in params) else 0
    for p in params:
        if p.numel >= min_size:
            total += states * (p.numel + math.ceil(p.numel / BNB_BLOCK) * 4)
        else:
            total += states * p.numel * 4
    return total


def _adafactor(params: Sequence[TrainedParam], beta1: float | None) -> OptimizerMemory:
    state = step = 0
    for p in params:
        factors = 0
        if len(p.shape) >= 2:
            factors = (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) * 4
            state += factors
        else:
            state += p.numel * 4
        state += 4 + (p.numel * 4 if beta1 is not None else 0)
        low = p.dtype in (torch.float16, torch.bfloat16)
        step = max(step, p.numel * 4 * (2 + 2 * low) + factors)
    return OptimizerMemory(state, step, "Adafactor: factored fp32 second moments")


def _prodigy(params: Sequence[TrainedParam], args: dict) -> OptimizerMemory:
    slice_p = int(args.get("slice_p", 1))
    beta1 = args.get("betas", (0.9, 0.999))[0]
    state = 0
    for p in params:
        sliced = math.ceil(p.numel / slice_p) * p.dtype.itemsize
        state += p.nbytes * (1 + (beta1 > 0)) + sliced + (p.dtype.itemsize if p.starts_at_zero else sliced)
    return OptimizerMemory(state, 0, "Prodigy: exp_avg, exp_avg_sq, s and p0 in the parameters' dtype")


def optimizer_memory(
    optimizer_type: str, optimizer_args: Sequence[str], params: Sequence[TrainedParam], foreach: bool = True
) -> OptimizerMemory:
    """The state and step memory of ``optimizer_type`` (upstream's names, or module.Class) over ``params``;
    ``foreach``: the step uses torch's foreach path (the default on CUDA)."""
    args = parse_key_value_args(list(optimizer_args), "--optimizer_args")
    key = _key(optimizer_type)
    total = sum(p.nbytes for p in params)
    largest = max((p.nbytes for p in params), default=0)
    min_size = int(args.get("min_8bit_size", BNB_MIN_8BIT_SIZE))
    if key in ("adamw", "adam"):
        copies = 3 if args.get("amsgrad") else 2
        step = total if foreach else 2 * largest
        return OptimizerMemory(copies * total + 4 * len(params), step, f"AdamW: {copies} states in the weights' dtype")
    if key in ("adamw8bit", "pagedadamw8bit"):
        return OptimizerMemory(_bnb(params, 2, min_size), 0, "AdamW8bit: two uint8 states and absmax per 256")
    if key in ("pagedadamw", "pagedadamw32bit"):
        return OptimizerMemory(_bnb(params, 2, 2**62), 0, "paged AdamW: two fp32 states")
    if key in ("lion8bit", "pagedlion8bit", "sgdnesterov8bit", "sgd8bit"):
        return OptimizerMemory(_bnb(params, 1, min_size), 0, "8-bit: one uint8 state and absmax per 256")
    if key == "adafactor":
        return _adafactor(params, args.get("beta1"))
    if key == "lion":
        return OptimizerMemory(total, 2 * largest, "Lion: exp_avg in the weights' dtype")
    if key in ("sgdnesterov", "sgd"):
        momentum = args.get("momentum", 0.9 if key == "sgdnesterov" else 0)
        if not momentum:
            return OptimizerMemory(0, 0, "SGD without momentum: no state")
        return OptimizerMemory(total, 0, "SGD: a momentum buffer")
    if key == "prodigy":
        return _prodigy(params, args)
    if key in ("adamwschedulefree", "radamschedulefree"):
        return OptimizerMemory(2 * total, 0, "schedule-free: z and exp_avg_sq")
    if key == "sgdschedulefree":
        return OptimizerMemory(total, 0, "schedule-free SGD: z")
    return OptimizerMemory(2 * total, 0, f"{optimizer_type}: assumed two states in the weights' dtype", known=False)
