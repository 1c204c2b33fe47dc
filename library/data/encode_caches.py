"""Filling the latent and text-encoder caches of a dataset group, in batches, with a progress bar.

The encoders come from the model family through two small protocols. With several processes (a ``Shard``) each
encodes every N-th image or caption: disk caches are written by the process that encoded them and read by all after
the barrier that follows caching; memory caches are exchanged between the processes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from library.data.caches import (
    CachedLatents,
    latents_npz_path,
    latents_problem,
    save_latents,
    save_text,
    text_npz_path,
    text_problem,
)  # fmt: skip
from library.data.captions import process_caption
from library.data.images import load_image, resize_and_crop, to_tensor
from library.data.items import ImageItem
from library.errors import UserError

logger = logging.getLogger(__name__)
_SHOW_STALE = 5


@dataclass(frozen=True)
class Shard:
    """This process's share of the caching work: entry ``i`` (in the dataset's order) is encoded by process
    ``i % count``."""

    index: int = 0
    count: int = 1

    def mine(self, position: int) -> bool:
        return position % self.count == self.index

    def exchange(self, local: dict) -> dict:
        """Every process's ``local`` results merged (a collective call: every process makes it)."""
        if self.count == 1:
            return local
        import torch.distributed as dist

        gathered: list = [None] * self.count
        dist.all_gather_object(gathered, local)
        return {k: v for part in gathered for k, v in part.items()}


class LatentEncoder(Protocol):
    cache_suffix: str  # e.g. "flux": <stem>_<W>x<H>_flux.npz
    latent_downscale: int
    latent_channels: int

    def encode_latents(self, images: Tensor, keys: list[tuple] | None = None) -> Tensor: ...  # [B,3,H,W] -> [B,C,H/8,W/8]


class TextEncoderOutputs(Protocol):
    cache_suffix: str  # <stem>_<suffix>_te.npz
    text_cache_keys: tuple[str, ...]
    text_cache_fingerprint: dict[str, object]  # settings stored in the file and compared on reuse
    text_cache_shapes: dict[str, tuple[int | None, ...]]

    def encode_text(self, captions: list[str]) -> dict[str, Tensor]: ...


def _report_stale(stale: list[tuple[Path, str]], what: str) -> None:
    for path, problem in stale[:_SHOW_STALE]:
        logger.warning("%s cache %s is out of date (%s); making it again", what, path, problem)
    if len(stale) > _SHOW_STALE:
        logger.warning("... and %d more %s cache files are made again", len(stale) - _SHOW_STALE, what)


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def check_latents_cacheable(items: list[ImageItem]) -> None:
    for item in items:
        for key in ("color_aug", "random_crop", "face_crop_aug_range"):
            if getattr(item.subset, key):
                raise UserError(f"{item.subset.where}: {key} changes the image every epoch, so it cannot be used with "
                                "--cache_latents / --cache_latents_to_disk; turn one of them off")  # fmt: skip


def cache_latents(
    items: list[ImageItem],
    encoder: LatentEncoder,
    *,
    to_disk: bool,
    skip_check: bool = False,
    batch_size: int = 1,
    shard: Shard = Shard(),
    seed: int = 0,
) -> int:
    """Encode every item's bucket-sized image (and its mirror with flip_aug) unless a valid cache exists; returns
    how many images this process encoded. Refuses augmentations a cache would freeze (color_aug, random_crop).
    Each image's posterior draw comes from a stream keyed by ``seed`` and the image."""
    check_latents_cacheable(items)
    todo: dict[tuple, list[ImageItem]] = {}
    others: dict[tuple, list[ImageItem]] = {}  # memory caches other processes encode
    stale: list[tuple[Path, str]] = []
    for position, item in enumerate(items):
        latent_size = (item.bucket[1] // encoder.latent_downscale, item.bucket[0] // encoder.latent_downscale)
        item.extra["latent_size"] = latent_size
        key = (item.path, item.bucket, item.resized_size, item.subset.flip_aug, item.subset.alpha_mask)
        if key in todo or key in others:
            (todo if key in todo else others)[key].append(item)
            continue
        if to_disk:
            item.latents_npz = latents_npz_path(item.path, item.size, encoder.cache_suffix)
            if skip_check and item.latents_npz.exists():
                continue
            problem = latents_problem(item.latents_npz, latent_size, encoder.latent_channels,
                                      flip=item.subset.flip_aug, alpha_mask=item.subset.alpha_mask)  # fmt: skip
            if problem is None:
                continue
            if problem != "missing":
                stale.append((item.latents_npz, problem))
            if not shard.mine(position):
                continue
        elif not shard.mine(position):
            others[key] = [item]
            continue
        todo[key] = [item]
    _report_stale(stale, "latent")
    groups = sorted(todo.values(), key=lambda same: same[0].bucket)
    by_bucket: dict[tuple[int, int], list[list[ImageItem]]] = {}
    for same in groups:
        by_bucket.setdefault(same[0].bucket, []).append(same)
    with tqdm(total=len(groups), desc="caching latents", unit="image", disable=not groups) as bar:
        for bucket_groups in by_bucket.values():
            for batch in _batches(bucket_groups, batch_size):
                _encode_latent_batch(batch, encoder, to_disk, seed)
                bar.update(len(batch))
    if not to_disk and shard.count > 1:
        shared = shard.exchange({key: same[0].latents for key, same in todo.items()})
        for key, same in others.items():
            for item in same:
                item.latents = shared[key]
    return len(groups)


def _encode_latent_batch(batch: list[list[ImageItem]], encoder: LatentEncoder, to_disk: bool, seed: int) -> None:
    pixels, masks, crops = [], [], []
    for same in batch:
        item = same[0]
        image = load_image(item.path, with_alpha=item.subset.alpha_mask)
        image, crop = resize_and_crop(image, item.bucket, item.resized_size, random_crop=False, rng=random.Random(0),
                                      interpolation=item.subset.resize_interpolation)  # fmt: skip
        tensor, alpha = to_tensor(image)
        pixels.append(tensor)
        masks.append(alpha)
        crops.append(crop)
    images = torch.stack(pixels)
    # each image's posterior draw is keyed by the image, so the cache is the same whichever process encodes it
    keys = [(seed, "latent cache", str(same[0].path), same[0].bucket) for same in batch]
    latents = encoder.encode_latents(images, keys).float().cpu().numpy()
    flipped = None
    if batch[0][0].subset.flip_aug or any(same[0].subset.flip_aug for same in batch):
        flipped = encoder.encode_latents(images.flip(-1), [(*key, "flipped") for key in keys]).float().cpu().numpy()
    for i, same in enumerate(batch):
        item = same[0]
        top, left = crops[i]
        cached = CachedLatents(
            latents=latents[i], original_size=item.size,
            crop_ltrb=(left, top, left + item.bucket[0], top + item.bucket[1]),
            flipped=flipped[i] if flipped is not None and item.subset.flip_aug else None,
            alpha_mask=masks[i].numpy() if item.subset.alpha_mask and masks[i] is not None else None,
        )  # fmt: skip
        if to_disk:
            save_latents(item.latents_npz, cached)
        for other in same:
            other.latents_npz = item.latents_npz if to_disk else None
            other.latents = None if to_disk else cached


def check_text_cacheable(items: list[ImageItem]) -> None:
    for item in items:
        options = item.subset.caption
        if options.varies:
            changing = [k for k in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                                    "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")
                        if getattr(options, k)]  # fmt: skip
            raise UserError(f"{item.subset.where}: {', '.join(changing) or 'the caption settings'} change the caption "
                            "during training, so text-encoder outputs cannot be cached; turn them off or drop "
                            "--cache_text_encoder_outputs")  # fmt: skip


def cache_text_encoder_outputs(
    items: list[ImageItem],
    encoder: TextEncoderOutputs,
    *,
    to_disk: bool,
    skip_check: bool = False,
    batch_size: int = 1,
    shard: Shard = Shard(),
) -> int:
    """Encode each distinct caption once (as training would process it) unless a valid cache exists; returns how
    many captions this process encoded."""
    check_text_cacheable(items)
    todo: dict[str, list[ImageItem]] = {}
    others: dict[str, list[ImageItem]] = {}  # memory caches other processes encode
    order: dict[str, int] = {}  # each distinct caption's position: which process encodes it
    stale: list[tuple[Path, str]] = []
    for item in items:
        item.extra["text_keys"] = encoder.text_cache_keys
        caption = process_caption(item.caption, item.subset.caption, random.Random(0))
        mine = shard.mine(order.setdefault(caption, len(order)))
        if to_disk:
            item.text_npz = text_npz_path(item.path, encoder.cache_suffix)
            if skip_check and item.text_npz.exists():
                continue
            problem = text_problem(item.text_npz, encoder.text_cache_keys, encoder.text_cache_fingerprint,
                                   encoder.text_cache_shapes)  # fmt: skip
            if problem is None:
                continue
            if problem != "missing":
                stale.append((item.text_npz, problem))
        if not mine:
            if not to_disk:
                others.setdefault(caption, []).append(item)
            continue
        todo.setdefault(caption, []).append(item)
    _report_stale(stale, "text-encoder output")
    captions = list(todo)
    with tqdm(total=len(captions), desc="caching text encoder outputs", unit="caption", disable=not captions) as bar:
        for batch in _batches(captions, batch_size):
            with torch.no_grad():
                outputs = encoder.encode_text(batch)
            arrays = {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                      for k, v in outputs.items()}  # fmt: skip
            for i, caption in enumerate(batch):
                one = {k: np.ascontiguousarray(v[i]) for k, v in arrays.items()}
                for item in todo[caption]:
                    if to_disk:
                        save_text(item.text_npz, one, encoder.text_cache_fingerprint)
                    else:
                        item.text = one
            bar.update(len(batch))
    if not to_disk and shard.count > 1:
        shared = shard.exchange({caption: same[0].text for caption, same in todo.items()})
        for caption, same in others.items():
            for item in same:
                item.text = shared[caption]
    return len(captions)
