"""Tensors spread over one or more safetensors files, read lazily one key at a time."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import safe_open

from library.io.safetensors_file import SafetensorsHeader, TensorInfo, read_header, safe_open_device


class TensorSource:
    """Key -> tensor over several files (a single checkpoint, or a sharded diffusers folder)."""

    def __init__(self, headers: Sequence[SafetensorsHeader]):
        self.headers = list(headers)
        self._file_of: dict[str, os.PathLike] = {}
        self._info: dict[str, TensorInfo] = {}
        for header in self.headers:
            for key, info in header.tensors.items():
                self._file_of[key] = header.path
                self._info[key] = info
        self._handles: dict[os.PathLike, object] = {}

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], option: str | None = None) -> TensorSource:
        return cls([read_header(p, option) for p in paths])

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def __contains__(self, key: str) -> bool:
        return key in self._info

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        path = self._file_of[key]
        handle = self._handles.get((path, str(device)))
        if handle is None:
            handle = safe_open(os.fspath(path), framework="pt", device=safe_open_device(device))
            self._handles[(path, str(device))] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Combine = Literal["same", "cat", "swap_halves"]


@dataclass(frozen=True)
class TensorRecipe:
    """How one target tensor is made from source tensors: as is, concatenated on dim 0, or halves swapped."""

    sources: tuple[str, ...]
    combine: Combine = "same"

    def shape(self, source: TensorSource) -> tuple[int, ...]:
        shapes = [source.info(k).shape for k in self.sources]
        if self.combine == "cat":
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return shapes[0]

    def dtype(self, source: TensorSource) -> str:
        return source.info(self.sources[0]).dtype

    def build(self, source: TensorSource, device: str | torch.device = "cpu") -> torch.Tensor:
        tensors = [source.get(k, device) for k in self.sources]
        if self.combine == "cat":
            return torch.cat(tensors, dim=0)
        if self.combine == "swap_halves":
            first, second = tensors[0].chunk(2, dim=0)
            return torch.cat([second, first], dim=0)
        return tensors[0]


def load_recipes(
    recipes: dict[str, TensorRecipe],
    source: TensorSource,
    dtype_for: Callable[[str], torch.dtype],
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Materialise every recipe, converting each tensor to its dtype as it is read (peak RAM ~ one tensor)."""
    out: dict[str, torch.Tensor] = {}
    for key, recipe in recipes.items():
        out[key] = recipe.build(source, device).to(dtype_for(key))
        if progress:
            progress(1)
    return out
