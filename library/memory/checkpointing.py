"""Gradient checkpointing attached from outside the model: each block's forward is recomputed in backward instead
of keeping its activations (layer CHECKPOINT of ``library/memory/wrappers.py``: around LoRA and fp8, inside block
swap). With ``cpu_offload`` (``--cpu_offload_checkpointing``) the inputs each block keeps for its recompute are
held on the CPU between forward and backward. Reversible with ``disable_block_checkpointing``."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from library.memory.wrappers import Layer, attach, detach, is_attached

CHECKPOINT_KEY = "gradient_checkpointing"


class TensorStash(Protocol):
    """Where a checkpointed block's saved inputs wait for backward."""

    def pack(self, tensor: Tensor) -> Any: ...

    def unpack(self, packed: Any) -> Tensor: ...


class HostStash:
    """Saved inputs copied to (pinned, for CUDA) host memory, back to their device when backward needs them. The
    copies run on the current stream without blocking the host: stream order keeps them correct."""

    def pack(self, tensor: Tensor) -> tuple[torch.device, Tensor]:
        if tensor.device.type == "cpu":
            return tensor.device, tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=tensor.is_cuda)
        host.copy_(tensor, non_blocking=tensor.is_cuda)
        return tensor.device, host

    def unpack(self, packed: tuple[torch.device, Tensor]) -> Tensor:
        device, host = packed
        return host.to(device, non_blocking=host.is_pinned())


def _checkpointed(stash: TensorStash | None, block: nn.Module, inner, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    names, count = tuple(kwargs), len(args)

    def run(*flat):  # keyword tensors go in positionally, so that checkpoint saves (and a stash holds) them too
        return inner(*flat[:count], **dict(zip(names, flat[count:])))

    if stash is None:
        return checkpoint(run, *args, *kwargs.values(), use_reentrant=False)
    with torch.autograd.graph.saved_tensors_hooks(stash.pack, stash.unpack):
        return checkpoint(run, *args, *kwargs.values(), use_reentrant=False)


def enable_block_checkpointing(
    blocks: Iterable[nn.Module], cpu_offload: bool = False, stash: TensorStash | None = None
) -> int:
    """Checkpoint each block (returns how many were newly wrapped). ``cpu_offload`` keeps the saved block inputs in
    ``stash`` (a :class:`HostStash` unless given) until backward."""
    if cpu_offload and stash is None:
        stash = HostStash()
    fn = functools.partial(_checkpointed, stash if cpu_offload else None)
    count = 0
    for block in blocks:
        if not is_attached(block, CHECKPOINT_KEY):
            attach(block, Layer.CHECKPOINT, CHECKPOINT_KEY, fn)
            count += 1
    return count


def disable_block_checkpointing(blocks: Iterable[nn.Module]) -> None:
    for block in blocks:
        if is_attached(block, CHECKPOINT_KEY):
            detach(block, CHECKPOINT_KEY)
