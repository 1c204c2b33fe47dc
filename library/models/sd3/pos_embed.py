"""Fixed 2-D sin-cos positional embeddings of the SD3 MMDiT, and the resolution-scaled tables of upstream's
``--enable_scaled_pos_embed`` (KohakuBlueleaf's method).

A table is [1, G*G, D] over a G x G grid of patches, rows outermost. The first D/2 channels encode the column
coordinate and the last D/2 the row coordinate, each as cat(sin(pos * w), cos(pos * w)) with
w_k = 10000^(-k / (D/4)), as Stability AI and diffusers build it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SCALED_GRID_RATIO = 1.5
SCALED_CENTRE_SPAN = 16.0
VAE_STRIDE = 8


def sincos_1d(embed_dim: int, positions: Tensor) -> Tensor:
    """[N, embed_dim]: cat(sin(pos * w), cos(pos * w)), w_k = 10000^(-k / (embed_dim/2)), in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width {embed_dim} must be even")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(embed_dim: int, row_coords: Tensor, col_coords: Tensor) -> Tensor:
    """[1, R*C, embed_dim] for a grid with these row and column coordinates (columns in the first half)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding width {embed_dim} must be a multiple of 4")
    rows, cols = torch.meshgrid(row_coords.to(torch.float64), col_coords.to(torch.float64), indexing="ij")
    table = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    return table.float().unsqueeze(0)


def sincos_2d_pos_embed(
    embed_dim: int, grid_size: int, scaling_factor: float | None = None, offset: float | None = None
) -> Tensor:
    """The stored MMDiT table: coordinates i / scaling_factor - offset for i in 0..grid_size-1 on both axes."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    if scaling_factor is not None:
        coords = coords / scaling_factor
    if offset is not None:
        coords = coords - offset
    return sincos_2d(embed_dim, coords, coords)


def scaled_grid_size(patched_size: int) -> int:
    """Side of the scaled table for a p x p training resolution: int(1.5 p)."""
    return int(patched_size * SCALED_GRID_RATIO)


def scaled_sincos_pos_embed(embed_dim: int, patched_size: int) -> Tensor:
    """Upstream's scaled table for a p x p training resolution: a grid of int(1.5 p) with coordinates
    (16/p) * (i - (grid - p)/2), so that the centred p x p crop always spans [0, 16)."""
    grid = scaled_grid_size(patched_size)
    coords = (SCALED_CENTRE_SPAN / patched_size) * (torch.arange(grid, dtype=torch.float64) - (grid - patched_size) / 2)
    return sincos_2d(embed_dim, coords, coords)


def patched_size_for_resolution(width: int, height: int, patch_size: int = 2) -> int:
    """p for a dataset resolution (not a bucket): (round(sqrt(w h)) // 8) // patch_size."""
    return (round(math.sqrt(width * height)) // VAE_STRIDE) // patch_size


def crop_table(
    table: Tensor, grid_size: int, h_patches: int, w_patches: int, offset: tuple[int, int] | None = None
) -> Tensor:
    """[1, h*w, D] window of a [1, G*G, D] table at (top, left) = ``offset``, or centred: ((G-h)//2, (G-w)//2)."""
    if h_patches > grid_size or w_patches > grid_size:
        raise ValueError(f"{h_patches}x{w_patches} patches do not fit in a {grid_size}x{grid_size} position table")
    top, left = offset if offset is not None else ((grid_size - h_patches) // 2, (grid_size - w_patches) // 2)
    if not (0 <= top <= grid_size - h_patches and 0 <= left <= grid_size - w_patches):
        raise ValueError(
            f"crop offset {(top, left)} puts {h_patches}x{w_patches} patches outside the {grid_size}x{grid_size} table"
        )
    spatial = table.reshape(1, grid_size, grid_size, table.shape[-1])[:, top : top + h_patches, left : left + w_patches]
    return spatial.reshape(1, h_patches * w_patches, table.shape[-1])


def random_offset(
    grid_size: int, h_patches: int, w_patches: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """A uniformly random (top, left) at which h x w patches fit in the G x G table (one per batch, as upstream)."""
    top = int(torch.randint(0, grid_size - h_patches + 1, (1,), generator=generator))
    left = int(torch.randint(0, grid_size - w_patches + 1, (1,), generator=generator))
    return top, left


class ScaledPosEmbed:
    """The scaled tables for a set of training resolutions, chosen per image by its token area.

    Thresholds lie halfway between successive p^2; the last is (1.5 p_max)^2, and larger areas use p_max too.
    An image wider or taller than its table gets a table for p = max(h, w), built once and cached, with a
    warning. Unlike upstream, such extra tables never change which table later images choose.
    """

    def __init__(self, hidden_size: int, patched_sizes: Iterable[int]):
        sizes = sorted(set(patched_sizes))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"scaled position embeddings need positive patched sizes, got {sizes}")
        self.hidden_size = hidden_size
        self.patched_sizes = tuple(sizes)
        self.thresholds = tuple(
            [(a * a + b * b) // 2 for a, b in zip(sizes, sizes[1:])] + [int((sizes[-1] * SCALED_GRID_RATIO) ** 2)]
        )
        self._tables = {p: scaled_sincos_pos_embed(hidden_size, p) for p in sizes}

    @classmethod
    def from_resolutions(
        cls, hidden_size: int, resolutions: Iterable[tuple[int, int]], patch_size: int = 2
    ) -> ScaledPosEmbed:
        """Tables for dataset resolutions given as (width, height) in pixels."""
        return cls(hidden_size, [patched_size_for_resolution(w, h, patch_size) for w, h in resolutions])

    def patched_size_for(self, h_patches: int, w_patches: int) -> int:
        """The p whose table an h x w image uses (before the too-small fallback)."""
        area = h_patches * w_patches
        return next(
            (p for p, limit in zip(self.patched_sizes, self.thresholds) if area <= limit), self.patched_sizes[-1]
        )

    def _table(self, h_patches: int, w_patches: int) -> tuple[Tensor, int]:
        p = self.patched_size_for(h_patches, w_patches)
        needed = max(h_patches, w_patches)
        if needed > scaled_grid_size(p):
            if needed not in self._tables:
                grid = scaled_grid_size(p)
                logger.warning(
                    "scaled position embedding: %dx%d patches exceed the %dx%d table chosen for their area (image "
                    "too tall or wide for the dataset resolutions); adding a table for p=%d",
                    h_patches, w_patches, grid, grid, needed,
                )  # fmt: skip
                self._tables[needed] = scaled_sincos_pos_embed(self.hidden_size, needed)
            p = needed
        return self._tables[p], scaled_grid_size(p)

    def grid_size_for(self, h_patches: int, w_patches: int) -> int:
        """Side of the table ``table_for`` crops for an h x w image (for drawing a random offset)."""
        return self._table(h_patches, w_patches)[1]

    def table_for(self, h_patches: int, w_patches: int, offset: tuple[int, int] | None = None) -> Tensor:
        """[1, h*w, hidden]: the chosen table cropped at ``offset`` (top, left), or centred."""
        table, grid = self._table(h_patches, w_patches)
        return crop_table(table, grid, h_patches, w_patches, offset)
