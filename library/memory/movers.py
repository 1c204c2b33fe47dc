"""How block swap moves weights between host memory and the compute device (``library/memory/block_swap.py``).

A mover queues work behind the compute issued so far and hands back a ticket; ``wait`` makes the compute issued
after it see that work done. Three kinds: :class:`CudaMover` (one copy stream, CUDA events, pinned staging
buffers, one worker thread for the host side), :class:`SyncMover` (plain synchronous copies: other devices, and
the CPU, where host and device are separate storages of the same memory) and :class:`SimulatedMover` (two devices
simulated on the CPU, copies delayed until waited for: what the CPU tests check placement with).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch
from torch import Tensor

Pairs = Sequence[tuple[Tensor, Tensor]]


class Mover(Protocol):
    device: torch.device  # the compute device

    def is_device(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` lives on the compute device."""

    def empty_device(self, like: Tensor) -> Tensor:
        """An uninitialised compute-device tensor shaped like ``like``."""

    def empty_host(self, like: Tensor) -> Tensor:
        """An uninitialised host tensor shaped like ``like``."""

    def submit(self, exchanges: Pairs, copies: Pairs) -> Any:
        """Queue, behind the compute issued so far: each (device, host) pair of ``exchanges`` trades contents,
        each (dst, src) pair of ``copies`` copies. Returns a ticket for ``wait``."""

    def wait(self, ticket: Any) -> None:
        """Compute issued from now on sees the ticket's work (and everything queued before it) done."""

    def synchronize(self) -> None:
        """Everything queued is done, host memory included (before the host reads offloaded weights)."""


class SyncMover:
    """Synchronous copies on a device without streams; on the CPU, host and device tensors are distinct storages."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def is_device(self, tensor: Tensor) -> bool:
        device = tensor.device
        return device.type == self.device.type and self.device.index in (None, device.index)

    def empty_device(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def empty_host(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")

    def submit(self, exchanges: Pairs, copies: Pairs) -> Any:
        _run_now(exchanges, copies)
        return None

    def wait(self, ticket: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _run_now(exchanges: Pairs, copies: Pairs) -> None:
    for device_tensor, host in exchanges:
        incoming = host.clone()
        host.copy_(device_tensor)
        device_tensor.copy_(incoming)
    for dst, src in copies:
        dst.copy_(src)


class SimulatedMover(SyncMover):
    """Two devices on the CPU: the tensors this mover allocated are the device's (NaN until a copy lands), and
    submitted work happens only when a ticket is waited for (or at ``synchronize``), in order, as on a copy stream
    that lags behind. Running a block whose copies were never waited for computes with wrong weights."""

    def __init__(self):
        super().__init__("cpu")
        self._device_storages: set[int] = set()
        self._allocated: list[Tensor] = []  # kept alive, so that a storage address never changes side
        self._queue: deque[tuple[int, Pairs, Pairs]] = deque()
        self.submitted = 0

    def is_device(self, tensor: Tensor) -> bool:
        return tensor.untyped_storage().data_ptr() in self._device_storages

    def empty_device(self, like: Tensor) -> Tensor:
        tensor = torch.empty(like.shape, dtype=like.dtype)
        if tensor.is_floating_point():
            tensor.fill_(math.nan)
        self._allocated.append(tensor)
        self._device_storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    def submit(self, exchanges: Pairs, copies: Pairs) -> int:
        self.submitted += 1
        self._queue.append((self.submitted, list(exchanges), list(copies)))
        return self.submitted

    def wait(self, ticket: int) -> None:
        while self._queue and self._queue[0][0] <= ticket:
            _, exchanges, copies = self._queue.popleft()
            _run_now(exchanges, copies)

    def synchronize(self) -> None:
        self.wait(self.submitted)


class CudaMover:
    """One copy stream; the host side (pageable memory through two pinned staging buffers per direction, so that a
    host copy overlaps the previous transfer) runs on one worker thread. The calling thread never waits for the GPU:
    ``wait`` only makes the current stream wait for the ticket's CUDA event."""

    def __init__(self, device: torch.device | str, chunk_mib: int = 32):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._chunk = chunk_mib << 20
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-swap")
        self._staging: dict[str, list[tuple[Tensor, torch.cuda.Event]]] = {}
        self._turn = {"h2d": 0, "d2h": 0}

    def is_device(self, tensor: Tensor) -> bool:
        return tensor.device == self.device

    def empty_device(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=self.device)

    def empty_host(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device="cpu")

    def submit(self, exchanges: Pairs, copies: Pairs) -> Future:
        ready = torch.cuda.current_stream(self.device).record_event()
        return self._worker.submit(self._run, ready, list(exchanges), list(copies))

    def wait(self, ticket: Future) -> None:
        torch.cuda.current_stream(self.device).wait_event(ticket.result())

    def synchronize(self) -> None:
        self._worker.submit(self.stream.synchronize).result()

    def _run(self, ready: torch.cuda.Event, exchanges: Pairs, copies: Pairs) -> torch.cuda.Event:
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)  # the outgoing weights' last kernels are done before they are copied
            for device_tensor, host in exchanges:
                self._transfer(_bytes(device_tensor), _bytes(host), to_device=True, to_host=True)
            for dst, src in copies:
                to_device = dst.device.type == "cuda"
                device_bytes, host_bytes = (_bytes(dst), _bytes(src)) if to_device else (_bytes(src), _bytes(dst))
                self._transfer(device_bytes, host_bytes, to_device=to_device, to_host=not to_device)
            return self.stream.record_event()

    def _buffer(self, direction: str) -> tuple[Tensor, torch.cuda.Event]:
        if direction not in self._staging:
            self._staging[direction] = [(torch.empty(self._chunk, dtype=torch.uint8, pin_memory=True),
                                         torch.cuda.Event()) for _ in range(2)]  # fmt: skip
        self._turn[direction] ^= 1
        return self._staging[direction][self._turn[direction]]

    def _transfer(self, device_bytes: Tensor, host_bytes: Tensor, to_device: bool, to_host: bool) -> None:
        """Chunk by chunk: device -> staging (async), host -> staging -> device (async), staging -> host. The copy
        stream orders the device read before the device write of each chunk."""
        for start in range(0, device_bytes.numel(), self._chunk):
            end = min(start + self._chunk, device_bytes.numel())
            device_part, host_part = device_bytes[start:end], host_bytes[start:end]
            if to_host:
                out_buffer, out_done = self._buffer("d2h")
                out_buffer = out_buffer[: end - start]
                out_buffer.copy_(device_part, non_blocking=True)
                out_done.record(self.stream)
            if to_device:
                in_buffer, in_done = self._buffer("h2d")
                in_done.synchronize()  # this buffer's previous transfer has left it
                in_buffer = in_buffer[: end - start]
                in_buffer.copy_(host_part)
                device_part.copy_(in_buffer, non_blocking=True)
                in_done.record(self.stream)
            if to_host:
                out_done.synchronize()
                host_part.copy_(out_buffer)


def _bytes(tensor: Tensor) -> Tensor:
    return tensor.view(-1).view(torch.uint8)
