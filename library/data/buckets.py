"""Aspect-ratio buckets, as upstream makes and chooses them.

With buckets on, the candidates are every (w, h) with sides in [min, max] in steps of ``bucket_reso_steps`` whose
area stays within resolution^2; an image goes to the candidate of nearest aspect ratio and is resized to cover it.
With ``bucket_no_upscale`` an image is only shrunk (to the maximum area) and its bucket is its own size rounded
down to the step. Without buckets every image goes to the one resolution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """Every bucket (w, h): the square of the maximum area, and for each width from ``min_size`` to ``max_size``
    the tallest height within the area (both orientations); sorted."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_bucket_range(min_reso: int, max_reso: int, steps: int) -> tuple[int, int, list[str]]:
    """min/max_bucket_reso made multiples of ``steps`` as upstream does (min rounded down, max rounded up, so the
    range only widens), with what changed."""
    notes = []
    new_min, new_max = min_reso - min_reso % steps, -(-max_reso // steps) * steps
    if new_min != min_reso:
        notes.append(f"min_bucket_reso {min_reso} -> {new_min}")
    if new_max != max_reso:
        notes.append(f"max_bucket_reso {max_reso} -> {new_max}")
    return new_min, new_max, notes


@dataclass(frozen=True)
class BucketSettings:
    resolution: tuple[int, int]  # (w, h); the maximum area is w * h
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False


class BucketAssigner:
    """Chooses each image's bucket and the size it is resized to before cropping."""

    def __init__(self, settings: BucketSettings):
        self.settings = settings
        s = settings
        if not s.enable_bucket:
            self.resos = [tuple(s.resolution)]
        elif s.bucket_no_upscale:
            self.resos = []
        else:
            self.resos = make_bucket_resolutions(s.resolution, s.min_bucket_reso, s.max_bucket_reso,
                                                 s.bucket_reso_steps)  # fmt: skip
        self._reso_set = set(self.resos)
        self._ratios = np.array([w / h for w, h in self.resos]) if self.resos else None
        self.max_area = s.resolution[0] * s.resolution[1]

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.settings.bucket_reso_steps

    def assign(self, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """(bucket (w, h), resized size (w, h)) for an image of ``size`` (w, h). Raises ValueError when the image is
        too small for any bucket (only possible with bucket_no_upscale)."""
        width, height = size
        ratio = width / height
        if not (self.settings.enable_bucket and self.settings.bucket_no_upscale):
            bucket = (width, height) if (width, height) in self._reso_set else None
            if bucket is None:
                bucket = self.resos[int(np.abs(self._ratios - ratio).argmin())]
            scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            # rounding can leave one pixel short of the bucket; cover it
            resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
            return tuple(bucket), resized
        if width * height > self.max_area:
            resized_w = math.sqrt(self.max_area * ratio)
            resized_h = self.max_area / resized_w
            by_w = self._round(resized_w)
            h_for_w = self._round(by_w / ratio)
            by_h = self._round(resized_h)
            w_for_h = self._round(by_h * ratio)
            error_w = abs(by_w / h_for_w - ratio) if h_for_w else math.inf
            error_h = abs(w_for_h / by_h - ratio) if by_h else math.inf
            if error_w < error_h:
                resized = (by_w, int(by_w / ratio + 0.5))
            else:
                resized = (int(by_h * ratio + 0.5), by_h)
        else:
            resized = (width, height)
        steps = self.settings.bucket_reso_steps
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise ValueError(f"{width}x{height} is smaller than bucket_reso_steps {steps} on one side")
        return bucket, resized


def bucket_summary(counts: Mapping[tuple[int, int], int]) -> str:
    """One line per bucket: its size, images (with repeats) and aspect ratio."""
    lines = []
    for i, ((w, h), n) in enumerate(sorted(counts.items())):
        lines.append(f"bucket {i}: {w}x{h} (aspect {w / h:.2f}), {n} images")
    total = sum(counts.values())
    lines.append(f"{len(counts)} buckets, {total} images with repeats")
    return "\n".join(lines)
