"""Latent and text-encoder output caches in upstream's npz files, written atomically and checked before reuse.

Latents: ``<stem>_<W>x<H>_<family>.npz`` beside the image (W, H: the image's own size, 4 digits), one file for
every resolution the image is trained at, keys suffixed by the latent size ``_<h>x<w>``: ``latents``,
``latents_flipped`` (with flip_aug), ``alpha_mask`` (with alpha_mask), ``original_size`` (w, h) and
``crop_ltrb``. Text: ``<stem>_<family>_te.npz`` with the family's output keys plus its settings fingerprint
(for FLUX ``apply_t5_attn_mask``, as upstream writes it).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from library.io.atomic import atomic_write

logger = logging.getLogger(__name__)


def latents_npz_path(image_path: Path, image_size: tuple[int, int], suffix: str) -> Path:
    width, height = image_size
    return image_path.with_name(f"{image_path.stem}_{width:04d}x{height:04d}_{suffix}.npz")


def text_npz_path(image_path: Path, suffix: str) -> Path:
    return image_path.with_name(f"{image_path.stem}_{suffix}_te.npz")


def latent_key_suffix(latent_size: tuple[int, int]) -> str:
    """``_<h>x<w>`` for a latent of (h, w), as upstream keys several resolutions in one file."""
    return f"_{latent_size[0]}x{latent_size[1]}"


@dataclass
class CachedLatents:
    latents: np.ndarray  # [C, h, w] float32
    original_size: tuple[int, int]  # (w, h) of the image file
    crop_ltrb: tuple[int, int, int, int]  # in the resized image
    flipped: np.ndarray | None = None
    alpha_mask: np.ndarray | None = None  # [H, W] float32 at the bucket's pixel size


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def latents_problem(
    path: Path, latent_size: tuple[int, int], channels: int, *, flip: bool, alpha_mask: bool
) -> str | None:
    """Why the cached latents at ``path`` cannot be used for this resolution (None when they can)."""
    if not path.exists():
        return "missing"
    suffix = latent_key_suffix(latent_size)
    try:
        with np.load(path) as npz:
            names = set(npz.files)
            if "latents" + suffix not in names:
                return f"no latents for {latent_size[1] * 8}x{latent_size[0] * 8}"
            if npz["latents" + suffix].shape != (channels, *latent_size):
                return f"latents have shape {npz['latents' + suffix].shape}, expected {(channels, *latent_size)}"
            if flip and "latents_flipped" + suffix not in names:
                return "no flipped latents (flip_aug is on)"
            if alpha_mask and "alpha_mask" + suffix not in names:
                return "no alpha mask (alpha_mask is on)"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"unreadable ({e})"
    return None


def load_latents(path: Path, latent_size: tuple[int, int]) -> CachedLatents:
    suffix = latent_key_suffix(latent_size)
    data = _read_npz(path)
    return CachedLatents(
        latents=data["latents" + suffix],
        original_size=tuple(int(v) for v in data["original_size" + suffix]),
        crop_ltrb=tuple(int(v) for v in data["crop_ltrb" + suffix]),
        flipped=data.get("latents_flipped" + suffix),
        alpha_mask=data.get("alpha_mask" + suffix),
    )


def save_latents(path: Path, cached: CachedLatents) -> None:
    """Add (or replace) one resolution in the file, keeping the other resolutions; atomic."""
    suffix = latent_key_suffix(cached.latents.shape[-2:])
    data: dict[str, np.ndarray] = {}
    if path.exists():
        try:
            data = {k: v for k, v in _read_npz(path).items() if not k.endswith(suffix)}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            data = {}
    data["latents" + suffix] = np.asarray(cached.latents, dtype=np.float32)
    data["original_size" + suffix] = np.array(cached.original_size)
    data["crop_ltrb" + suffix] = np.array(cached.crop_ltrb)
    if cached.flipped is not None:
        data["latents_flipped" + suffix] = np.asarray(cached.flipped, dtype=np.float32)
    if cached.alpha_mask is not None:
        data["alpha_mask" + suffix] = np.asarray(cached.alpha_mask, dtype=np.float32)
    _write_npz(path, data)


def text_problem(
    path: Path,
    keys: tuple[str, ...],
    fingerprint: dict[str, object],
    shapes: dict[str, tuple[int | None, ...]] | None = None,
) -> str | None:
    """Why the cached text-encoder outputs at ``path`` cannot be used (None when they can). ``shapes`` gives
    expected shapes per key (None: any size on that axis), e.g. the T5 sequence length."""
    if not path.exists():
        return "missing"
    try:
        with np.load(path) as npz:
            names = set(npz.files)
            for key in keys:
                if key not in names:
                    return f"no {key}"
            for key, expected in fingerprint.items():
                if key not in names:
                    return f"written without the {key} setting"
                if npz[key].item() != expected:
                    return f"written with {key}={npz[key].item()}, now {expected}"
            for key, shape in (shapes or {}).items():
                found = npz[key].shape
                if len(found) != len(shape) or any(e is not None and e != f for e, f in zip(shape, found)):
                    return f"{key} has shape {found}, expected {shape}"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"unreadable ({e})"
    return None


def load_text(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    data = _read_npz(path)
    return {key: data[key] for key in keys}


def save_text(path: Path, outputs: dict[str, np.ndarray], fingerprint: dict[str, object]) -> None:
    data = {key: np.asarray(value) for key, value in outputs.items()}
    data.update({key: np.array(value) for key, value in fingerprint.items()})
    _write_npz(path, data)


def _write_npz(path: Path, data: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **data)

    atomic_write(path, write)
