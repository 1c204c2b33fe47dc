"""Streaming safetensors writer (``--mem_eff_save``): tensors go to disk one at a time, each moved to the CPU (and
cast) only when it is written, so RAM never holds the whole state twice.

The format is upstream's ``mem_eff_save_file`` (and the safetensors spec): an 8-byte little-endian header length,
a JSON header with ``__metadata__`` and ``{"dtype", "shape", "data_offsets"}`` per tensor, space-padded so that
8 + length is a multiple of 256, then the tensors' bytes back to back in header order. Every write is atomic.

``save_state`` is what the model savers call: one dtype rule, streamed or through safetensors' ``save_file``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import Tensor

from library.io.atomic import atomic_write
from library.io.safetensors_file import SAFETENSORS_DTYPES, atomic_save_file

ALIGN = 256
ITERATOR_HEADER_RESERVE = 1 << 20  # header bytes kept free when tensors come from a one-pass iterator
MOVE_CHUNK = 64 << 20  # bytes copied at a time when the data must move after the header is known
_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor whose shape and dtype are known before it is made; ``make()`` runs only when it is written."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], Tensor]


TensorItems = Mapping[str, Tensor | PendingTensor] | Iterable[tuple[str, Tensor | PendingTensor]]


def cast_later(tensor: Tensor, dtype: torch.dtype | None) -> PendingTensor:
    """``tensor`` on the CPU in ``dtype`` (None, or a non-float tensor: its own dtype), made when written."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return PendingTensor(tuple(tensor.shape), target, lambda: tensor.detach().to("cpu", target))


def _code(name: str, dtype: torch.dtype) -> str:
    try:
        return _CODES[dtype]
    except KeyError:
        raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors") from None


def _spec(value: Tensor | PendingTensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(value.shape), value.dtype


def _entry(name: str, shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> tuple[dict, int]:
    size = torch.Size(shape).numel() * dtype.itemsize
    return {"dtype": _code(name, dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}, offset + size


def string_metadata(metadata: Mapping[str, object] | None) -> dict[str, str] | None:
    """safetensors metadata holds strings: ``str(value)`` as upstream; empty or None gives None."""
    return {str(k): v if isinstance(v, str) else str(v) for k, v in metadata.items()} if metadata else None


def _header_bytes(entries: dict[str, dict], metadata: dict[str, str] | None, size: int = 0) -> bytes:
    """Length prefix + JSON, space-padded to ``size`` bytes or to the next multiple of ALIGN."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    header.update(entries)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    total = max(size, 8 + len(text) + (-(8 + len(text)) % ALIGN))
    text += b" " * (total - 8 - len(text))
    return struct.pack("<Q", len(text)) + text


def _planned_header(items: Iterable[tuple[str, Tensor | PendingTensor]], metadata: dict[str, str] | None) -> int:
    entries, offset = {}, 0
    for name, value in items:
        entries[name], offset = _entry(name, *_spec(value), offset)
    return len(_header_bytes(entries, metadata))


def _write_tensor(f: BinaryIO, name: str, value: Tensor | PendingTensor) -> tuple[tuple[int, ...], torch.dtype]:
    tensor = value.make() if isinstance(value, PendingTensor) else value
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(value, PendingTensor) and _spec(tensor) != _spec(value):
        raise ValueError(f"tensor {name!r}: made {_spec(tensor)}, announced {_spec(value)}")
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel():
        f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return _spec(tensor)


def _move(f: BinaryIO, src: int, dst: int, length: int) -> None:
    """Move ``length`` bytes at ``src`` to ``dst`` inside the file, chunk by chunk, overlapping ranges included."""
    starts = range(0, length, MOVE_CHUNK)
    for start in reversed(starts) if dst > src else starts:
        n = min(MOVE_CHUNK, length - start)
        f.seek(src + start)
        chunk = f.read(n)
        f.seek(dst + start)
        f.write(chunk)
    f.truncate(dst + length)


def _write_file(tmp: str, items: Iterable[tuple[str, Tensor | PendingTensor]], metadata: dict[str, str] | None) -> None:
    one_pass = isinstance(items, Iterator)
    reserve = ITERATOR_HEADER_RESERVE if one_pass else _planned_header(items, metadata)
    entries: dict[str, dict] = {}
    offset = 0
    with open(tmp, "w+b") as f:
        f.seek(reserve)
        for name, value in items:
            if name in entries:
                raise ValueError(f"tensor {name!r} is given twice")
            entries[name], offset = _entry(name, *_write_tensor(f, name, value), offset)
            del value  # the next tensor is made while this loop holds none
        header = _header_bytes(entries, metadata)
        if len(header) != reserve and (len(header) > reserve or offset <= MOVE_CHUNK):
            _move(f, reserve, len(header), offset)
        else:
            header = _header_bytes(entries, metadata, size=reserve)
        f.seek(0)
        f.write(header)


def mem_eff_save_file(
    tensors: TensorItems, path: str | os.PathLike, metadata: Mapping[str, object] | None = None
) -> None:
    """Write ``tensors`` (a mapping, or (name, tensor) pairs; values may be ``PendingTensor``) one at a time.

    A mapping or a list is read twice (header first, then the data); a one-pass iterator gets 1 MiB of header
    room, and the data moves only when the header needs more (or the file is small). Metadata values are stored as
    ``str(value)``. Atomic: a kill at any moment leaves either the old file at ``path`` or the new one."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    atomic_write(path, lambda tmp: _write_file(tmp, items, string_metadata(metadata)))


def _in_memory(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    out, seen = {}, set()
    for name, tensor in state.items():
        tensor = cast_later(tensor, dtype).make()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor  # save_file refuses tied tensors (T5's shared)
        seen.add(storage)
    return out


def save_state(
    state: Mapping[str, Tensor],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    metadata: Mapping[str, object] | None = None,
    mem_eff: bool = False,
) -> None:
    """Save ``state`` with every float tensor in ``dtype`` (None keeps each tensor's own), atomically: streamed one
    tensor at a time with ``mem_eff``, else built on the CPU and written by safetensors' ``save_file``."""
    if mem_eff:
        mem_eff_save_file({name: cast_later(t, dtype) for name, t in state.items()}, path, metadata)
    else:
        atomic_save_file(_in_memory(state, dtype), path, string_metadata(metadata))
