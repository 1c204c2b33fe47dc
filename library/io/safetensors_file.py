"""Reading and writing single-file safetensors checkpoints safely.

The header is parsed by hand first so that a wrong, truncated or non-safetensors file is reported in
one line naming the file and the option it was given to, before any tensor is read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import UserError
from library.io.atomic import atomic_write

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def dtypes(self) -> set[str]:
        return {t.dtype for t in self.tensors.values()}


def _describe(option: str | None) -> str:
    return f"{option} " if option else ""


def _looks_like_pickle(path: Path) -> bool:
    """A zip (torch.save) or a pickle (protocol 2+ starts with 0x80) -- but not a safetensors file, whose 8-byte
    header length may start with 0x80 too: its JSON header begins right after, with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def read_header(path: str | os.PathLike, option: str | None = None) -> SafetensorsHeader:
    """Parse and validate a safetensors header; raise UserError naming ``option`` and the file on any problem."""
    path = Path(path)
    what = f"{_describe(option)}{path}"
    if not path.exists():
        raise UserError(f"{what}: file not found")
    if path.is_dir():
        raise UserError(f"{what}: is a folder, expected a .safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_like_pickle(path):
        raise UserError(
            f"{what}: is a pickle checkpoint ({path.suffix or 'no suffix'}); pickle files can run code when loaded "
            "and are not read. Convert it to .safetensors first"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise UserError(f"{what}: is not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len == 0 or header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{what}: is not a safetensors file (no valid header; is it a text or other file?)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{what}: is not a safetensors file (header unreadable: {e})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for key, entry in header.items():
        try:
            tensors[key] = TensorInfo(entry["dtype"], tuple(int(s) for s in entry["shape"]))
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise UserError(f"{what}: is damaged (bad header entry for tensor {key!r})") from None
    if 8 + header_len + data_end > size:
        raise UserError(
            f"{what}: is truncated ({size} bytes, the header needs {8 + header_len + data_end}); "
            "download or copy it again"
        )
    return SafetensorsHeader(path=path, tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()})


def safe_open_device(device: str | torch.device) -> str:
    """The device string safetensors accepts: accelerate names the CPU of each process ``cpu:0``, which
    ``safe_open`` refuses; the CPU is ``cpu``."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def iter_tensors(
    path: str | os.PathLike,
    keys: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) one at a time, so a caller converting dtypes never holds the file twice."""
    with safe_open(os.fspath(path), framework="pt", device=safe_open_device(device)) as f:
        for key in keys if keys is not None else f.keys():
            yield key, f.get_tensor(key)


def atomic_save_file(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file so that a kill at any moment leaves either the old file or the new one."""
    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, tmp, metadata=dict(metadata) if metadata else None))
