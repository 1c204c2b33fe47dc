"""What every family's sampling shares (inference scripts and training samples): latents to pictures, pictures to
files, and models moved to the device only while they run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from library.io.atomic import atomic_write


@torch.no_grad()
def decode_images(ae: nn.Module, latents: Tensor) -> list[Image.Image]:
    """Decode latents with the autoencoder (which speaks model-space latents) and convert [-1, 1] pixels to RGB."""
    param = next(ae.parameters())
    pixels = ae.decode(latents.to(param.device, param.dtype)).float().clamp(-1, 1)
    arrays = ((pixels.permute(0, 2, 3, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (a kill never leaves a half-written image)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return Path(path)


def free_png_path(folder: Path, stem: str) -> Path:
    """``folder/stem.png``, or ``stem_2.png``, ... when an image of that name (same second, same seed) exists."""
    path, n = folder / f"{stem}.png", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}_{n}.png"
    return path


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device, offload: bool) -> Iterator[nn.Module]:
    """Move ``module`` to ``device`` for the block; with ``offload`` move it back to the CPU afterwards."""
    module.to(device)
    try:
        yield module
    finally:
        if offload:
            module.to("cpu")
