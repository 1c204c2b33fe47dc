"""``--debug_dataset``: show what training would see (buckets, processed captions) and optionally save the
processed images, without loading a model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from library.data.dataset import DatasetGroup, EpochPosition
from library.io.atomic import atomic_write

logger = logging.getLogger(__name__)


def _save(pixels, path: Path) -> None:
    array = ((pixels.permute(1, 2, 0).clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _save_sample(batch: dict, i: int, folder: Path, name: str) -> None:
    """The processed image (unless latents are cached), its alpha mask and its conditioning image, as PNGs."""
    if batch["images"] is not None:
        _save(batch["images"][i], folder / f"{name}.png")
    if batch["alpha_masks"] is not None:
        _save(batch["alpha_masks"][i].unsqueeze(0).expand(3, -1, -1) * 2 - 1, folder / f"{name}_mask.png")
    if batch["conditioning_images"] is not None:
        _save(batch["conditioning_images"][i], folder / f"{name}_conditioning.png")


def show_dataset(group: DatasetGroup, save_dir: Path | None = None, epochs: int = 1, out=print) -> int:
    """Print the bucket summary and every batch of the first ``epochs`` epochs (bucket, files, captions as
    processed, conditioning images); with ``save_dir`` also write each processed image, its mask and its
    conditioning image as PNG (``<name>.png``, ``<name>_mask.png``, ``<name>_conditioning.png``). Returns the
    batches shown."""
    out(group.summary())
    conditioning = "control image" if group.options.conditioning == "control" else "mask image"
    shown = 0
    for epoch in range(1, epochs + 1):
        for index in range(len(group)):
            batch = group[EpochPosition(epoch, index, step=0)]
            _, items = group.epoch_order(epoch)[index]
            out(f"epoch {epoch} batch {index}: bucket {items[0].bucket[0]}x{items[0].bucket[1]}")
            for i, (path, caption) in enumerate(zip(batch["image_paths"], batch["captions"])):
                extra = f", custom attributes {batch['custom_attributes'][i]}" if batch["custom_attributes"][i] else ""
                if items[i].conditioning_path is not None:
                    extra += f", {conditioning}: {items[i].conditioning_path}"
                out(f"  {path}: loss weight {batch['loss_weights'][i].item():g}, caption: {caption!r}{extra}")
                if save_dir is not None:
                    _save_sample(batch, i, save_dir, f"e{epoch}_b{index:05d}_{i}_{Path(path).stem}")
            shown += 1
    if save_dir is not None:
        logger.info("saved the processed images to %s", save_dir)
    return shown
