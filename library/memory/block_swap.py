"""Block swap (``--blocks_to_swap``): the last ``k`` of ``N`` blocks keep their weights in host memory and stream
to the compute device ahead of use, in forward and in backward. Attached from outside the model (layer PLACEMENT
of ``library/memory/wrappers.py``: around checkpointing, LoRA and fp8).

Only ``.weight`` parameters move, by replacing ``.data``, so Parameter identity is kept; biases, norm scales,
buffers and LoRA stay on the device. A swap trades a block that has just run with the next one needed: the
outgoing weights go into the incoming block's host storage, the incoming ones into the outgoing block's device
storage, so nothing is allocated in the steady state and at most ``N - k`` blocks are ever resident. In
backward a block always gets back the device storage it ran forward in: autograd may hold views of it.

Schedules; every pass starts and ends with blocks ``0 .. N-k-1`` resident:
- training: forward, after block ``i < k``: ``i`` out, ``N-k+i`` in; backward, once block ``i >= N-k`` is done:
  ``i`` out, ``i+k-N`` in. Gradient checkpointing recomputes inside the block, so it runs resident.
- forward only (sampling, or any pass without grad): as training's forward, and when ``2k <= N`` the last ``k``
  give way to the first ``k`` again (``2k`` transfers per call); otherwise every block cycles (``N`` transfers).
Either way, repeated calls never re-place all blocks. A block found off the device (an interrupted pass, an
unusual call order) is fetched before it runs, so placement is always correct, only sometimes late.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from library.errors import UserError
from library.memory.movers import CudaMover, Mover, SyncMover
from library.memory.wrappers import Layer, attach, detach

logger = logging.getLogger(__name__)

_TRAIN, _FORWARD = "train", "forward"


def max_swappable(num_blocks: int) -> int:
    """How many of ``num_blocks`` can be swapped: two must stay resident for the swaps to overlap compute."""
    return max(0, num_blocks - 2)


def check_num_swap(num_swap: int, num_blocks: int, what: str = "blocks") -> None:
    if num_swap < 0 or num_swap > max_swappable(num_blocks):
        raise UserError(f"--blocks_to_swap {num_swap}: the model has {num_blocks} {what}, of which 0 to "
                        f"{max_swappable(num_blocks)} can be swapped; give a number in that range")  # fmt: skip


def split_flux_swap(n: int, num_double: int, num_single: int) -> tuple[int, int]:
    """FLUX counts a double block as two single blocks: ``n`` becomes ``(n // 2, 2 * (n - n // 2))`` swapped
    (double, single) blocks, as upstream. UserError naming the largest valid ``n`` beyond either list's limit."""
    if n < 0:
        raise UserError(f"--blocks_to_swap {n}: give 0 or more")

    def fits(m: int) -> bool:
        return m // 2 <= max_swappable(num_double) and 2 * (m - m // 2) <= max_swappable(num_single)

    if not fits(n):
        largest = max(m for m in range(n + 1) if fits(m))
        raise UserError(f"--blocks_to_swap {n}: FLUX.1 would swap {n // 2} of {num_double} double and "
                        f"{2 * (n - n // 2)} of {num_single} single blocks; at most {largest} is possible (a double "
                        "block counts as two single blocks)")  # fmt: skip
    return n // 2, 2 * (n - n // 2)


def default_mover(device: torch.device | str) -> Mover:
    device = torch.device(device)
    return CudaMover(device) if device.type == "cuda" else SyncMover(device)


class _Signal(torch.autograd.Function):
    """Identity on tensors whose backward first calls ``callback``: it fires once gradients reach this point."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


def _signal(callback, tree):
    """``tree`` with its tensors that require grad passed through :class:`_Signal`."""
    leaves, spec = tree_flatten(tree)
    marked = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf.requires_grad]
    if not marked:
        return tree
    for i, tensor in zip(marked, _Signal.apply(callback, *(leaves[i] for i in marked))):
        leaves[i] = tensor
    return tree_unflatten(leaves, spec)


@dataclass
class _Block:
    module: nn.Module
    weights: dict[str, nn.Parameter]  # the parameters that move, by name within the block


class BlockSwap:
    """Swap the last ``num_swap`` of ``blocks`` (same-shaped blocks share storage; others allocate) between host
    memory and ``device``. ``mover`` defaults to a :class:`CudaMover` on CUDA and a :class:`SyncMover` elsewhere."""

    def __init__(
        self, blocks: Sequence[nn.Module], num_swap: int, device: torch.device | str, *, mover: Mover | None = None,
        name: str = "blocks",
    ):  # fmt: skip
        check_num_swap(num_swap, len(blocks), name)
        self.name = name
        self.num_swap = num_swap
        self.device = torch.device(device)
        self.mover = mover if mover is not None else default_mover(self.device)
        self.blocks = [_Block(b, {n: p for n, p in b.named_parameters() if n.rpartition(".")[2] == "weight"})
                       for b in blocks]  # fmt: skip
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self._slot = [i if i < len(blocks) - num_swap else None for i in range(len(blocks))]  # device storage held
        self._ran_in: dict[int, int] = {}  # block -> the storage it ran forward in, for its backward
        self._pending: dict[int, object] = {}  # block -> ticket of the work bringing it in
        self._weight_origins: list[tuple[nn.Parameter, bool]] = []  # weight, was on the device (for detach)
        self._other_origins: list[tuple[nn.Module, str, bool, torch.device]] = []  # holder, name, is_param, device
        self._pass: str | None = None
        self._forward_only = False
        self._attached = False

    # --- public API ---

    def attach(self) -> None:
        """Place the blocks (non-weight tensors and the first ``N-k`` blocks' weights on the device, the last
        ``k`` blocks' weights in host memory) and hook them."""
        if self._attached:
            raise RuntimeError(f"block swap of {self.name} is already attached")
        if self.num_swap == 0:
            self._attached = True
            return
        self._place_all(initial=True)
        for block in self.blocks:
            attach(block.module, Layer.PLACEMENT, self, self._run_block)
        self._attached = True
        moved = sum(p.numel() * p.element_size() for b in self.blocks[-self.num_swap :] for p in b.weights.values())
        logger.info("block swap: %d of %d %s stream from host memory (%.2f GB of weights off the device)",
                    self.num_swap, len(self.blocks), self.name, moved / 1e9)  # fmt: skip

    def detach(self) -> None:
        """Unhook, and put every tensor back on the device it had before ``attach``."""
        if not self._attached:
            raise RuntimeError(f"block swap of {self.name} is not attached")
        self._attached = False
        if self.num_swap == 0:
            return
        for block in self.blocks:
            detach(block.module, self)
        self._place_all(initial=False)
        self._slot = [i if i < len(self.blocks) - self.num_swap else None for i in range(len(self.blocks))]
        self._ran_in.clear()
        self._pass = None

    def prepare_for_training(self) -> None:
        """Before a forward that has a backward: start bringing the placement back to its initial state if a pass
        left it elsewhere (a forward without backward, an error). Nothing to do, and no copy, after a full step."""
        self._pass = None
        if self._attached and self.num_swap:
            self._place([i < len(self.blocks) - self.num_swap for i in range(len(self.blocks))])

    @contextmanager
    def forward_only(self) -> Iterator[BlockSwap]:
        """Calls inside run the forward-only schedule (sampling): no backward hooks, and each call leaves the
        placement as it found it, so consecutive denoising steps move only the blocks they must."""
        previous, self._forward_only = self._forward_only, True
        self.prepare_for_training()
        try:
            yield self
        finally:
            self._forward_only = previous
            self._pass = None

    def synchronize(self) -> None:
        """Finish every queued copy (before the host reads offloaded weights, e.g. to save them)."""
        self.mover.synchronize()
        self._pending.clear()

    def offloaded_trained_weights(self) -> list[nn.Parameter]:
        """Trained weights that sit in host memory after a step: a plain ``optimizer.step()`` would see them with
        gradients on the device, so such training needs optimizer steps fused into backward."""
        return [p for b in self.blocks[len(self.blocks) - self.num_swap :] for p in b.weights.values()
                if p.requires_grad]  # fmt: skip

    def weights(self) -> set[int]:
        """ids of the parameters this swapper moves."""
        return {id(p) for b in self.blocks for p in b.weights.values()} if self.num_swap else set()

    # --- hooks ---

    def _run_block(self, module: nn.Module, inner, *args, **kwargs):
        args, kwargs = self._before(module, (args, kwargs))
        return self._after(module, inner(*args, **kwargs))

    # Compiled blocks run the two below eagerly (they move data and hook autograd); the block index stays out of
    # compiled code, so that one graph serves every block.
    @torch.compiler.disable
    def _before(self, module: nn.Module, inputs):
        index = self._index[id(module)]
        if index == 0 or self._pass is None:
            self._start_pass()
        self._ensure(index, forward=True)
        if self._pass == _TRAIN:
            self._ran_in[index] = self._slot[index]
            inputs = _signal(functools.partial(self._backward_done, index), inputs)
        return inputs

    @torch.compiler.disable
    def _after(self, module: nn.Module, outputs):
        index, n, k = self._index[id(module)], len(self.blocks), self.num_swap
        if self._pass == _TRAIN:
            outputs = _signal(functools.partial(self._backward_starts, index), outputs)
            if index < k:
                self._exchange(index, n - k + index)
        elif 2 * k <= n:
            if index < k:
                self._exchange(index, n - k + index)
            elif index >= n - k:
                self._exchange(index, index - (n - k))
        else:
            self._exchange(index, (n - k + index) % n)
        if index == n - 1:
            self._pass = None
        return outputs

    def _start_pass(self) -> None:
        self._pass = _FORWARD if self._forward_only or not torch.is_grad_enabled() else _TRAIN
        self._place([i < len(self.blocks) - self.num_swap for i in range(len(self.blocks))])

    def _backward_starts(self, index: int) -> None:
        self._ensure(index, forward=False)

    def _backward_done(self, index: int) -> None:
        target = index + self.num_swap - len(self.blocks)
        if target >= 0 and self._ran_in.get(target) == self._slot[index]:
            self._exchange(index, target)

    # --- placement ---

    def _ensure(self, index: int, forward: bool) -> None:
        """Block ``index`` is about to run: make the compute wait for its weights. A block found off the device is
        fetched now; in backward, into the very storage it ran forward in, because autograd may have saved views of
        its weights there (``F.linear`` saves ``weight.t()``) instead of the weights themselves."""
        n = len(self.blocks)
        storage = None if forward else self._ran_in.get(index)
        if storage is not None and self._slot[index] != storage:
            holder = self._slot.index(storage)
            if self._slot[index] is not None:  # resident in another storage: step aside first
                self._exchange(index, next(j for j in range(n) if self._slot[j] is None))
            self._exchange(holder, index)
        elif self._slot[index] is None:
            resident = [j for j in range(n) if self._slot[j] is not None]
            self._exchange(max(resident, key=lambda j: (j - index) % n if forward else (index - j) % n), index)
        ticket = self._pending.pop(index, None)
        if ticket is not None:
            self.mover.wait(ticket)

    def _place(self, target: list[bool]) -> None:
        resident = [slot is not None for slot in self._slot]
        extra = [i for i, (now, want) in enumerate(zip(resident, target)) if now and not want]
        missing = [i for i, (now, want) in enumerate(zip(resident, target)) if want and not now]
        for out, into in zip(extra, missing):
            self._exchange(out, into)

    def _exchange(self, out: int, into: int) -> None:
        """Queue block ``out`` to host memory and block ``into`` to the device, trading storage where weights
        match in name, shape and dtype; the parameters point at their new places at once."""
        if self._slot[out] is None or self._slot[into] is not None:
            return
        mover, outgoing = self.mover, self.blocks[out].weights
        exchanges, copies, updates = [], [], []
        for name, param in self.blocks[into].weights.items():
            host, partner = param.data, outgoing.get(name)
            if partner is not None and partner.shape == host.shape and partner.dtype == host.dtype:
                exchanges.append((partner.data, host))
                updates += [(param, partner.data), (partner, host)]
            else:
                device_tensor = mover.empty_device(host)
                copies.append((device_tensor, host))
                updates.append((param, device_tensor))
        matched = {id(p) for p, _ in updates}
        for param in outgoing.values():
            if id(param) not in matched:
                host = mover.empty_host(param.data)
                copies.append((host, param.data))
                updates.append((param, host))
        ticket = mover.submit(exchanges, copies)
        for param, data in updates:
            param.data = data
        self._slot[into], self._slot[out] = self._slot[out], None
        self._pending.pop(out, None)
        self._pending[into] = ticket

    def _place_all(self, initial: bool) -> None:
        """attach (``initial``): non-weight tensors to the device, weights where the schedule starts; detach: every
        tensor back where attach found it."""
        mover, copies, updates = self.mover, [], []
        if initial:
            for index, block in enumerate(self.blocks):
                for param in block.weights.values():
                    self._weight_origins.append((param, mover.is_device(param.data)))
                    updates.append((param, param.data.contiguous(), self._slot[index] is not None))
                self._move_others(block.module)
        else:
            mover.synchronize()
            updates = [(param, param.data, on_device) for param, on_device in self._weight_origins]
            for holder, leaf, is_param, device in self._other_origins:
                if is_param:
                    holder._parameters[leaf].data = holder._parameters[leaf].data.to(device)
                else:
                    holder._buffers[leaf] = holder._buffers[leaf].to(device)
            self._weight_origins, self._other_origins = [], []
        placed = []
        for param, data, on_device in updates:
            if on_device != mover.is_device(data):
                target = mover.empty_device(data) if on_device else mover.empty_host(data)
                copies.append((target, data))
                data = target
            placed.append((param, data))
        mover.wait(mover.submit([], copies))
        mover.synchronize()
        for param, data in placed:
            param.data = data
        self._pending.clear()

    def _move_others(self, module: nn.Module) -> None:
        for holder in module.modules():
            for leaf, param in holder._parameters.items():
                if param is not None and leaf != "weight":
                    self._other_origins.append((holder, leaf, True, param.device))
                    param.data = param.data.to(self.device)
            for leaf, buffer in holder._buffers.items():
                if buffer is not None:
                    self._other_origins.append((holder, leaf, False, buffer.device))
                    holder._buffers[leaf] = buffer.to(self.device)


def move_except_swapped(model: nn.Module, device: torch.device | str, swaps: Sequence[BlockSwap]) -> None:
    """Move ``model``'s parameters and buffers to ``device``, except the weights the ``swaps`` place (load the
    model in host memory, attach the swaps, then call this: the swapped weights never visit the device)."""
    skipped = set().union(*(swap.weights() for swap in swaps))
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in skipped:
                param.data = param.data.to(device)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def swap_blocks(
    model: nn.Module, groups: Sequence[tuple[Sequence[nn.Module], int, str]], device: torch.device | str
) -> list[BlockSwap]:
    """Attach a :class:`BlockSwap` for each (blocks, number to swap, name) with something to swap, then move the rest
    of ``model`` (loaded in host memory) to ``device``: the swapped weights never visit the device."""
    swaps = [BlockSwap(blocks, k, device, name=name) for blocks, k, name in groups if k]
    for swap in swaps:
        swap.attach()
    move_except_swapped(model, device, swaps)
    return swaps
