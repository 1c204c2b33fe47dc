"""The training dataset: datasets of one resolution each, grouped; batches drawn from one bucket of one dataset.

Order and augmentation are functions of (seed, epoch, batch position), never of process-wide random state, so a
resumed run, a run with data-loader workers and an uninterrupted run see the same batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from library.data.buckets import BucketAssigner, BucketSettings, bucket_summary
from library.data.caches import load_latents, load_text
from library.data.captions import process_caption
from library.data.config import DatasetConfig, command_line_fallback_keys, configs_from_folders, load_dataset_config
from library.data.encode_caches import (
    LatentEncoder,
    Shard,
    TextEncoderOutputs,
    cache_latents,
    cache_text_encoder_outputs,
)  # fmt: skip
from library.data.images import (
    LoadedImage,
    Placement,
    bucket_placement,
    face_placement,
    face_position,
    list_images,
    load_image,
    place,
    to_tensor,
)
from library.data.items import ImageItem, balance_regularization, split_for_validation, subset_items, tag_frequency
from library.errors import UserError

logger = logging.getLogger(__name__)

# command-line option -> config key, where the names differ (as upstream maps them)
_OPTION_TO_KEY = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}
# what conditioning_data_dir images are: loss masks for --masked_loss (network and full training, as upstream's
# network trainers use them) or control hints (ControlNet training)
CONDITIONING_KINDS = ("mask", "control")
# the parser default add_controlnet_dataset_args sets, read by DatasetOptions.from_args
_CONDITIONING_DEST = "dataset_conditioning"


@dataclass(frozen=True)
class DatasetOptions:
    dataset_config: Path | None = None
    train_data_dir: Path | None = None
    reg_data_dir: Path | None = None
    in_json: Path | None = None
    conditioning_data_dir: Path | None = None  # with train_data_dir: upstream's ControlNet folder style
    conditioning: Literal["mask", "control"] = "mask"  # what conditioning_data_dir images are (CONDITIONING_KINDS)
    fallbacks: dict[str, object] = field(default_factory=dict)  # command-line values for config keys
    seed: int = 0
    prior_loss_weight: float = 1.0
    masked_loss: bool = False
    latent_multiple: int = 16  # bucket sides must be multiples of this (FLUX/SD3: VAE 8 x patch 2)
    cache_latents: bool = False
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = False
    cache_text_encoder_outputs_to_disk: bool = False
    skip_cache_check: bool = False
    vae_batch_size: int = 1
    text_encoder_batch_size: int | None = None

    def __post_init__(self):
        if self.conditioning not in CONDITIONING_KINDS:
            raise ValueError(f"conditioning must be one of {CONDITIONING_KINDS}, not {self.conditioning!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DatasetOptions:
        """The options of a parser built with ``add_dataset_args`` (and ``add_controlnet_dataset_args`` for
        ControlNet training, which makes conditioning images control hints)."""
        fallbacks = {}
        for key in command_line_fallback_keys():
            option = next((o for o, k in _OPTION_TO_KEY.items() if k == key), key)
            value = getattr(args, option, None)
            if key == "caption_extension" and getattr(args, "caption_extention", None):
                value = args.caption_extention  # upstream's misspelt alias
            if value is not None:
                fallbacks[key] = _cli_value(option, value)
        path = lambda v: Path(v) if v else None  # noqa: E731
        return cls(
            dataset_config=path(args.dataset_config), train_data_dir=path(args.train_data_dir),
            reg_data_dir=path(args.reg_data_dir), in_json=path(args.in_json), fallbacks=fallbacks,
            conditioning_data_dir=path(getattr(args, "conditioning_data_dir", None)),
            conditioning=getattr(args, _CONDITIONING_DEST, "mask"),
            seed=args.seed or 0, prior_loss_weight=args.prior_loss_weight, masked_loss=args.masked_loss,
            cache_latents=args.cache_latents or args.cache_latents_to_disk,
            cache_latents_to_disk=args.cache_latents_to_disk,
            cache_text_encoder_outputs=args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk,
            cache_text_encoder_outputs_to_disk=args.cache_text_encoder_outputs_to_disk,
            skip_cache_check=args.skip_cache_check, vae_batch_size=args.vae_batch_size,
            text_encoder_batch_size=args.text_encoder_batch_size,
        )  # fmt: skip


def _cli_value(option: str, value: object) -> object:
    """Command-line strings for list-valued keys ("512,768", "2.0,4.0") as the config would hold them."""
    if option in ("resolution", "face_crop_aug_range") and isinstance(value, str):
        try:
            parts = [float(v) if option == "face_crop_aug_range" else int(v) for v in value.split(",")]
        except ValueError:
            raise UserError(f"--{option} {value}: expected a number or two numbers separated by a comma") from None
        return parts[0] if len(parts) == 1 and option == "resolution" else parts
    return value


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    """upstream's --validation_split / --validation_seed: the fallback for every dataset's validation_split /
    validation_seed (a config's own values win, as for every dataset key)."""
    g = parser.add_argument_group("validation images")
    g.add_argument("--validation_split", type=float, default=0.0,
                   help="share of each subset's images held out for validation loss (0 to 1)")  # fmt: skip
    g.add_argument("--validation_seed", type=int, default=None,
                   help="seed choosing the held-out images (default: --seed)")  # fmt: skip


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """upstream's dataset options (names and defaults); config files override them per dataset/subset."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset_config", type=str, default=None, help="dataset config file (.toml or .json)")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of '<repeats>_<class tokens>' folders")
    g.add_argument("--reg_data_dir", type=str, default=None, help="regularization images, same folder layout")
    g.add_argument("--in_json", type=str, default=None, help="fine-tune style metadata file for --train_data_dir")
    g.add_argument("--dataset_repeats", type=int, default=1, help="repeats with --in_json")
    g.add_argument("--resolution", type=str, default=None, help="'size' or 'width,height'")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=1024)
    g.add_argument("--bucket_reso_steps", type=int, default=64)
    g.add_argument("--bucket_no_upscale", action="store_true")
    g.add_argument("--caption_extension", type=str, default=".caption")
    g.add_argument("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)
    g.add_argument("--caption_separator", type=str, default=",")
    g.add_argument("--caption_prefix", type=str, default=None)
    g.add_argument("--caption_suffix", type=str, default=None)
    g.add_argument("--shuffle_caption", action="store_true")
    g.add_argument("--keep_tokens", type=int, default=0)
    g.add_argument("--keep_tokens_separator", type=str, default="")
    g.add_argument("--secondary_separator", type=str, default=None)
    g.add_argument("--enable_wildcard", action="store_true")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0)
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=0)
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0)
    g.add_argument("--token_warmup_min", type=int, default=1)
    g.add_argument("--token_warmup_step", type=float, default=0)
    g.add_argument("--flip_aug", action="store_true")
    g.add_argument("--color_aug", action="store_true")
    g.add_argument("--random_crop", action="store_true")
    g.add_argument("--face_crop_aug_range", type=str, default=None)
    g.add_argument("--alpha_mask", action="store_true", help="the alpha channel is the loss mask")
    g.add_argument("--resize_interpolation", type=str, default=None)
    g.add_argument("--cache_info", action="store_true", help="cache image sizes and captions per folder")
    g = parser.add_argument_group("latent and text-encoder caches")
    g.add_argument("--cache_latents", action="store_true")
    g.add_argument("--cache_latents_to_disk", action="store_true")
    g.add_argument("--vae_batch_size", type=int, default=1)
    g.add_argument("--skip_cache_check", action="store_true", help="reuse cache files without checking them")
    g.add_argument("--cache_text_encoder_outputs", action="store_true")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    g.add_argument("--text_encoder_batch_size", type=int, default=None)
    g.add_argument("--debug_dataset", action="store_true", help="show buckets and processed captions, then stop")
    g.add_argument("--debug_dataset_dir", type=str, default=None, help="with --debug_dataset: save processed images")


def add_controlnet_dataset_args(parser: argparse.ArgumentParser) -> None:
    """ControlNet training's dataset side: ``--conditioning_data_dir`` (with ``--train_data_dir``: one subset over
    the images in that folder, 1 repeat, as upstream), and every conditioning image read as a control hint (the
    parser's ``DatasetOptions.from_args`` gives ``conditioning="control"``). Only the ControlNet parser adds this;
    the other trainers reject --conditioning_data_dir (training/args.py UNSUPPORTED)."""
    g = parser.add_argument_group("ControlNet dataset")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="control images for the images in --train_data_dir, paired by file name")  # fmt: skip
    parser.set_defaults(**{_CONDITIONING_DEST: "control"})


class ImageDataset:
    """One ``[[datasets]]`` entry: its images in buckets, batched ``batch_size`` at a time within a bucket."""

    def __init__(self, config: DatasetConfig, items: list[ImageItem], latent_multiple: int):
        self.config = config
        self.items = items
        self.num_train_images = sum(i.num_repeats for i in items if not i.is_reg)
        self.num_reg_images = sum(i.num_repeats for i in items if i.is_reg)
        settings = BucketSettings(
            resolution=config.resolution, enable_bucket=config.enable_bucket, min_bucket_reso=config.min_bucket_reso,
            max_bucket_reso=config.max_bucket_reso, bucket_reso_steps=config.bucket_reso_steps,
            bucket_no_upscale=config.bucket_no_upscale,
        )  # fmt: skip
        _check_multiple(config, latent_multiple)
        assigner = BucketAssigner(settings)
        self.buckets: dict[tuple[int, int], list[ImageItem]] = {}
        for item in items:
            try:
                item.bucket, item.resized_size = assigner.assign(item.size)
            except ValueError as e:
                raise UserError(f"{config.where}: image {item.path} is too small for a bucket ({e}); remove it or "
                                "turn off bucket_no_upscale") from None  # fmt: skip
            if item.bucket[0] % latent_multiple or item.bucket[1] % latent_multiple:
                raise UserError(f"{config.where}: {item.path} falls in bucket {item.bucket}, not a multiple of "
                                f"{latent_multiple}; set bucket_reso_steps to a multiple of {latent_multiple}")  # fmt: skip
            item.extra["face_crop"] = not config.enable_bucket and item.subset.face_crop_aug_range is not None
            self.buckets.setdefault(item.bucket, []).extend([item] * item.num_repeats)
        self.buckets = dict(sorted(self.buckets.items()))
        self.num_processes = 1
        self.num_batches = self._count_batches()

    @property
    def global_batch_size(self) -> int:
        """The samples of one step across all processes: the batch size per device times the processes."""
        return self.config.batch_size * self.num_processes

    def _count_batches(self) -> int:
        return sum(math.ceil(len(entries) / self.global_batch_size) for entries in self.buckets.values())

    def set_num_processes(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.num_batches = self._count_batches()

    def epoch_batches(self, seed: int, epoch: int, index: int) -> list[list[ImageItem]]:
        """This epoch's (global) batches: each bucket shuffled, then cut into batches of ``global_batch_size``
        (upstream's scheme); with N processes each takes its part of every batch (``DatasetGroup.shard``)."""
        rng = random.Random(f"{seed}/{epoch}/{index}")
        batches = []
        for entries in self.buckets.values():
            entries = list(entries)
            rng.shuffle(entries)
            size = self.global_batch_size
            batches.extend(entries[i : i + size] for i in range(0, len(entries), size))
        return batches

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {bucket: len(entries) for bucket, entries in self.buckets.items()}

    def metadata(self) -> dict:
        """upstream's ss_datasets entry. As upstream, regularization subsets count every image found (balancing may
        leave some out), subsets without images are left out, and resize_interpolation is the dataset's (here: the
        one its subsets share)."""
        counts = {id(s): sum(1 for i in self.items if i.subset is s) for s in self.config.subsets}
        counts.update({id(s): len(list_images(s.image_dir)) for s in self.config.subsets if s.is_reg})
        subsets = [_subset_metadata(s, counts[id(s)]) for s in self.config.subsets if counts[id(s)]]
        interpolations = {s.resize_interpolation for s in self.config.subsets}
        return {
            "is_dreambooth": self.config.kind == "dreambooth", "batch_size_per_device": self.config.batch_size,
            "num_train_images": self.num_train_images,
            "num_reg_images": sum(s["img_count"] * s["num_repeats"] for s in subsets if s.get("is_reg")),
            "resolution": tuple(self.config.resolution), "enable_bucket": self.config.enable_bucket,
            "min_bucket_reso": self.config.min_bucket_reso, "max_bucket_reso": self.config.max_bucket_reso,
            "tag_frequency": tag_frequency(self.items), "bucket_info": self.bucket_info(),
            "resize_interpolation": interpolations.pop() if len(interpolations) == 1 else None, "subsets": subsets,
        }  # fmt: skip

    def bucket_info(self) -> dict:
        counts = self.bucket_counts()
        errors = [abs(i.size[0] / i.size[1] - i.bucket[0] / i.bucket[1]) for i in self.items]
        return {
            "buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(counts.items())},
            "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0,
        }


def _check_multiple(config: DatasetConfig, multiple: int) -> None:
    width, height = config.resolution
    if not config.enable_bucket and (width % multiple or height % multiple):
        raise UserError(f"{config.where}: resolution {width}x{height} is not a multiple of {multiple}; "
                        f"use a multiple of {multiple} or enable_bucket")  # fmt: skip
    if config.enable_bucket and config.bucket_reso_steps % multiple:
        raise UserError(f"{config.where}: bucket_reso_steps {config.bucket_reso_steps} is not a multiple of {multiple}")


def _subset_metadata(subset, img_count: int) -> dict:
    c = subset.caption
    meta = {
        "img_count": img_count, "num_repeats": subset.num_repeats,
        "color_aug": subset.color_aug, "flip_aug": subset.flip_aug, "random_crop": subset.random_crop,
        "shuffle_caption": c.shuffle_caption, "keep_tokens": c.keep_tokens,
        "keep_tokens_separator": c.keep_tokens_separator, "secondary_separator": c.secondary_separator,
        "enable_wildcard": c.enable_wildcard, "caption_prefix": c.caption_prefix, "caption_suffix": c.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
    }  # fmt: skip
    if subset.image_dir:
        meta["image_dir"] = subset.image_dir.name
    if subset.metadata_file:
        meta["metadata_file"] = subset.metadata_file.name
    else:
        meta.update(class_tokens=subset.class_tokens, is_reg=subset.is_reg)
    return meta


@dataclass
class EpochPosition:
    """What the data loader asks for: batch ``index`` of ``epoch``, drawn at global ``step``."""

    epoch: int
    index: int
    step: int


class EpochSampler(Sampler):
    """Yields EpochPosition keys read in the main process, so data-loader workers (persistent or not) always see
    the current epoch and step."""

    def __init__(self, group: DatasetGroup):
        self.group = group

    def __len__(self) -> int:
        return len(self.group)

    def __iter__(self) -> Iterator[EpochPosition]:
        epoch = self.group.current_epoch
        for index in range(len(self.group)):
            yield EpochPosition(epoch, index, self.group.current_step)


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run; ``group[i]`` is the i-th batch of the current epoch (a dict, see ``make_batch``)."""

    def __init__(self, datasets: list[ImageDataset], options: DatasetOptions, from_config: bool):
        self.datasets = datasets
        self.options = options
        self.from_config = from_config
        self.current_epoch = 1
        self.current_step = 0
        self.max_train_steps = 0
        self.process_index, self.num_processes = 0, 1
        self._order: tuple[int, list[tuple[int, list[ImageItem]]]] | None = None

    # --- what the loop uses ---
    def __len__(self) -> int:
        return sum(d.num_batches for d in self.datasets)

    def set_current_epoch(self, epoch: int) -> None:
        self.current_epoch = epoch

    def set_current_step(self, step: int) -> None:
        self.current_step = step

    def set_max_train_steps(self, steps: int) -> None:
        self.max_train_steps = steps

    def sampler(self) -> EpochSampler:
        return EpochSampler(self)

    def shard(self, num_processes: int, process_index: int) -> None:
        """Train on ``num_processes`` processes: every batch becomes a global batch of the datasets' batch size
        times ``num_processes`` samples (cut from the same shuffled buckets as one process with that batch size
        would), and ``self[i]`` is this process's part of global batch i. So N processes with batch size b train
        on the same samples, in the same order, as one process with batch size N*b."""
        self.num_processes, self.process_index = num_processes, process_index
        for dataset in self.datasets:
            dataset.set_num_processes(num_processes)
        self._order = None

    def cache_latents(self, encoder: LatentEncoder, *, shard: Shard = Shard()) -> int:
        """Fill the latent cache (memory, or npz files with --cache_latents_to_disk); returns images this process
        encoded (with several processes, each encodes its ``shard``)."""
        o = self.options
        return cache_latents(self.all_items(), encoder, to_disk=o.cache_latents_to_disk, skip_check=o.skip_cache_check,
                             batch_size=o.vae_batch_size, shard=shard, seed=o.seed)  # fmt: skip

    def cache_text_encoder_outputs(self, encoder: TextEncoderOutputs, *, shard: Shard = Shard()) -> int:
        """Fill the text-encoder output cache; returns captions this process encoded."""
        o = self.options
        batch_size = o.text_encoder_batch_size or max(d.config.batch_size for d in self.datasets)
        return cache_text_encoder_outputs(
            self.all_items(), encoder, to_disk=o.cache_text_encoder_outputs_to_disk, skip_check=o.skip_cache_check,
            batch_size=batch_size, shard=shard,
        )  # fmt: skip

    def __getitem__(self, key: int | EpochPosition) -> dict:
        if not isinstance(key, EpochPosition):
            key = EpochPosition(self.current_epoch, int(key), self.current_step)
        dataset_index, items = self.epoch_order(key.epoch)[key.index]
        n, r, count = len(items), self.process_index, self.num_processes
        positions = list(range(r * n // count, (r + 1) * n // count))
        padded = not positions  # fewer samples than processes: this one computes a zero-weight copy
        positions = positions or [0]
        rngs = [random.Random(f"{self.options.seed}/{key.epoch}/batch{key.index}/{p}") for p in positions]
        batch = make_batch([items[p] for p in positions], self.options, rngs, epoch=key.epoch, step=key.step,
                           max_train_steps=self.max_train_steps)  # fmt: skip
        batch["padding"] = padded
        if padded:
            batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
        # the loss is summed over this part and divided by the global batch's share per process, so that the
        # processes' average (what DDP's gradient averaging computes) is the mean over the global batch
        batch["loss_denominator"] = n / count
        batch["sample_keys"] = [(key.epoch, key.index, p) for p in positions]
        return batch

    def epoch_order(self, epoch: int) -> list[tuple[int, list[ImageItem]]]:
        """Every batch of the epoch as (dataset index, items), shuffled across datasets from (seed, epoch)."""
        if self._order is None or self._order[0] != epoch:
            batches = [
                (i, b) for i, d in enumerate(self.datasets) for b in d.epoch_batches(self.options.seed, epoch, i)
            ]
            random.Random(f"{self.options.seed}/{epoch}").shuffle(batches)
            self._order = (epoch, batches)
        return self._order[1]

    # --- what users and metadata see ---
    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.datasets[0].config.resolution) if self.datasets else (1024, 1024)

    def all_items(self) -> list[ImageItem]:
        return [item for d in self.datasets for item in d.items]

    def summary(self) -> str:
        lines = []
        for d in self.datasets:
            c = d.config
            kind = c.kind
            if kind == "controlnet":
                kind += " (conditioning images are " + ("control hints)" if self.options.conditioning == "control"
                                                         else "loss masks)")  # fmt: skip
            lines.append(f"{c.where}: {kind}, resolution {c.resolution[0]}x{c.resolution[1]}, batch size "
                         f"{c.batch_size}, {len(d.items)} images ({d.num_train_images} train + {d.num_reg_images} "
                         f"reg with repeats), {d.num_batches} batches per epoch")  # fmt: skip
            lines.extend("  " + line for line in bucket_summary(d.bucket_counts()).splitlines())
        return "\n".join(lines)

    def metadata(self) -> dict[str, object]:
        """upstream's dataset ss_* keys (ss_datasets with a config file; flat keys for folder-style datasets)."""
        import json

        infos = [d.metadata() for d in self.datasets]
        meta: dict[str, object] = {
            "ss_num_train_images": self.num_train_images, "ss_num_reg_images": sum(i["num_reg_images"] for i in infos),
            "ss_num_batches_per_epoch": len(self), "ss_cache_latents": self.options.cache_latents,
            "ss_prior_loss_weight": self.options.prior_loss_weight,
        }  # fmt: skip
        tags: dict = {}
        for info in infos:
            for folder, counts in info["tag_frequency"].items():
                tags.setdefault(folder, counts)
        dirs: dict[str, dict] = {}
        for s in (s for info in infos for s in info["subsets"] if not s.get("is_reg")):
            name = s.get("metadata_file", s.get("image_dir"))
            unique, n = name, 2
            while unique in dirs:  # the same folder in several subsets: "name (2)", as upstream
                unique, n = f"{name} ({n})", n + 1
            dirs[unique] = {"n_repeats": s["num_repeats"], "img_count": s["img_count"]}
        if self.from_config or not infos:
            meta.update(
                ss_datasets=json.dumps(infos), ss_tag_frequency=json.dumps(tags), ss_dataset_dirs=json.dumps(dirs)
            )
            return meta
        d, info = self.datasets[0], infos[0]
        subset = d.config.subsets[0]
        reg = {s["image_dir"]: {"n_repeats": s["num_repeats"], "img_count": s["img_count"]}
               for s in info["subsets"] if s.get("is_reg")}  # fmt: skip
        meta.update(
            ss_batch_size_per_device=d.config.batch_size, ss_resolution=str(tuple(d.config.resolution)),
            ss_color_aug=subset.color_aug, ss_flip_aug=subset.flip_aug, ss_random_crop=subset.random_crop,
            ss_shuffle_caption=subset.caption.shuffle_caption, ss_enable_bucket=d.config.enable_bucket,
            ss_bucket_no_upscale=d.config.bucket_no_upscale, ss_min_bucket_reso=d.config.min_bucket_reso,
            ss_max_bucket_reso=d.config.max_bucket_reso, ss_keep_tokens=subset.caption.keep_tokens,
            ss_dataset_dirs=json.dumps(dirs), ss_reg_dataset_dirs=json.dumps(reg),
            ss_tag_frequency=json.dumps(info["tag_frequency"]), ss_bucket_info=json.dumps(info["bucket_info"]),
        )  # fmt: skip
        return meta


class ValidationGroup(DatasetGroup):
    """The held-out images (validation_split). Its batches never change: the loop's epoch and step are ignored, so
    every validation pass sees the same batches in the same order with the same crops and flips."""

    def set_current_epoch(self, epoch: int) -> None:
        """Ignored: validation batches are always those of epoch 1."""

    def set_current_step(self, step: int) -> None:
        """Ignored: validation captions have no step-dependent warm-up."""


def data_loader_workers(requested: int) -> int:
    """--max_data_loader_n_workers capped at the CPUs this process may use (upstream caps at os.cpu_count(); the
    affinity count is what torch's DataLoader warns against), never below 0."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(0, min(requested, available))


def build_dataset_group(options: DatasetOptions) -> DatasetGroup:
    """The training group of ``build_dataset_groups`` (images held out by validation_split are left out)."""
    return build_dataset_groups(options)[0]


def build_dataset_groups(options: DatasetOptions) -> tuple[DatasetGroup, ValidationGroup | None]:
    """Read and check the config (or folders), scan every image's size and caption, split off validation images
    (validation_split) and assign buckets: (training group, validation group or None when nothing is held out).
    Raises UserError for any problem, before a model is loaded."""
    if options.dataset_config:
        if options.train_data_dir or options.reg_data_dir or options.in_json or options.conditioning_data_dir:
            logger.warning("--dataset_config is given, so --train_data_dir / --reg_data_dir / --in_json / "
                           "--conditioning_data_dir are ignored")  # fmt: skip
        configs = load_dataset_config(options.dataset_config, options.fallbacks)
    elif options.train_data_dir:
        if options.conditioning == "control" and options.conditioning_data_dir is None:
            raise UserError("ControlNet training with --train_data_dir needs --conditioning_data_dir (the control "
                            "images, paired with the images in --train_data_dir by file name)")  # fmt: skip
        configs = configs_from_folders(options.train_data_dir, options.reg_data_dir, options.in_json, options.fallbacks,
                                       conditioning_data_dir=options.conditioning_data_dir)  # fmt: skip
    elif options.conditioning_data_dir:
        raise UserError("--conditioning_data_dir needs --train_data_dir (the training images it pairs with), or use "
                        "--dataset_config with conditioning_data_dir in each subset")  # fmt: skip
    else:
        raise UserError("no training images: give --dataset_config or --train_data_dir")
    datasets, validation = [], []
    for config in configs:
        if config.enable_bucket and any(s.face_crop_aug_range for s in config.subsets):
            logger.warning("%s: face_crop_aug_range works only without enable_bucket (as upstream); it is not used",
                           config.where)  # fmt: skip
        _check_conditioning(config, options)
        train, held = _split_dataset(config, options.seed)
        if held:
            validation.append(ImageDataset(*_validation_dataset(config, held), options.latent_multiple))
        datasets.append(ImageDataset(config, train, options.latent_multiple))
    group = DatasetGroup(datasets, options, from_config=bool(options.dataset_config))
    if len(group) == 0:
        raise UserError("the dataset has no images; check image_dir / --train_data_dir and num_repeats"
                        + (" (validation_split holds out every training image)" if validation else ""))  # fmt: skip
    held_group = ValidationGroup(validation, options, from_config=bool(options.dataset_config)) if validation else None
    if held_group is not None:
        logger.info("validation: %d images held out of %d datasets", held_group.num_train_images, len(validation))
    return group, held_group


def _check_conditioning(config: DatasetConfig, options: DatasetOptions) -> None:
    if options.conditioning == "control" and options.masked_loss and not any(s.alpha_mask for s in config.subsets):
        logger.warning("%s: --masked_loss has no mask here: in ControlNet training the conditioning images are control "
                       "hints, not loss masks (set alpha_mask for a mask from the images' alpha)", config.where)  # fmt: skip
    if options.conditioning == "control" and config.kind != "controlnet":
        raise UserError(f"{config.where}: ControlNet training needs a control image for every training image; set "
                        "conditioning_data_dir in every subset (or give --train_data_dir with "
                        "--conditioning_data_dir)")  # fmt: skip
    if options.conditioning == "mask" and config.kind == "controlnet" and not options.masked_loss:
        raise UserError(f"{config.where}: conditioning_data_dir subsets are mask images for --masked_loss here; "
                        "add --masked_loss (ControlNet training uses flux_train_control_net.py)")  # fmt: skip


def _split_dataset(config: DatasetConfig, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """The dataset's training items (with balanced regularization images) and its validation items."""
    split = config.validation_split
    split_seed = config.validation_seed if config.validation_seed is not None else seed
    train, reg, held = [], [], []
    for subset in config.subsets:
        items = subset_items(subset)
        if subset.is_reg:
            reg.extend(items)  # regularization images are never held out (as upstream)
            continue
        kept, out = split_for_validation(items, split, split_seed)
        train.extend(kept)
        held.extend(out)
        if split > 0 and items and not out:
            logger.warning("%s: validation_split %g holds out none of its %d images (round(%d x %g) = 0)",
                           subset.where, split, len(items), len(items), split)  # fmt: skip
    if reg and not train and not held:
        raise UserError(f"{config.where}: only regularization subsets (is_reg = true); add training images")
    if train and not reg and any(s.is_reg for s in config.subsets):
        logger.warning("%s: the regularization subsets have no images", config.where)
    if reg and not train:
        logger.warning("%s: validation_split holds out every training image, so its regularization images are not "
                       "used either", config.where)  # fmt: skip
        return [], held
    return train + balance_regularization(train, reg), held


def _validation_dataset(config: DatasetConfig, held: list[ImageItem]) -> tuple[DatasetConfig, list[ImageItem]]:
    """The held-out images as a dataset of their own: one repeat each (as upstream) and captions without random
    changes (no shuffle, dropout, tag dropout or warm-up), so every validation pass sees the same batches."""
    views = {}
    for subset in config.subsets:
        if not subset.is_reg:
            caption = dataclasses.replace(subset.caption, shuffle_caption=False, caption_dropout_rate=0.0,
                                          caption_dropout_every_n_epochs=0, caption_tag_dropout_rate=0.0,
                                          token_warmup_step=0)  # fmt: skip
            views[id(subset)] = dataclasses.replace(subset, where=f"{subset.where} (validation)", num_repeats=1,
                                                    caption=caption)  # fmt: skip
    for item in held:
        item.subset, item.num_repeats = views[id(item.subset)], 1
    return dataclasses.replace(config, where=f"{config.where} (validation)", subsets=tuple(views.values())), held


def make_batch(
    items: list[ImageItem], options: DatasetOptions, rngs: list[random.Random], *, epoch: int, step: int,
    max_train_steps: int,
) -> dict:
    """One batch: ``latents`` (cached) or ``images`` [B, 3, H, W] in [-1, 1]; ``captions`` and ``text`` (cached
    encoder outputs or None); ``loss_weights`` [B] (prior_loss_weight for regularization images);
    ``alpha_masks`` [B, H, W] or None; ``conditioning_images`` [B, 3, H, W] in [-1, 1] at the bucket's pixel size
    (control hints with ``conditioning="control"``, mask images otherwise; placed exactly like their images) or None;
    ``network_multipliers`` [B]; ``original_sizes_hw``, ``crop_top_lefts``, ``target_sizes_hw`` [B, 2];
    ``image_paths``; ``custom_attributes`` (each sample's subset's table, as upstream) and
    ``diff_output_preservation`` [B] bool (samples whose target is the base model's prediction)."""
    samples = [_sample(item, options, rng) for item, rng in zip(items, rngs)]
    captions = [process_caption(item.caption, item.subset.caption, rng, epoch=epoch, step=step,
                                max_train_steps=max_train_steps) for item, rng in zip(items, rngs)]  # fmt: skip
    texts = [_cached_text(item) for item in items]
    any_alpha = any(item.subset.alpha_mask for item in items)
    masks = [s["alpha"] if s["alpha"] is not None else torch.ones(s["hw"]) for s in samples] if any_alpha else None
    weights = [options.prior_loss_weight if item.is_reg else 1.0 for item in items]
    cached = samples[0]["latents"] is not None
    return {
        "latents": torch.stack([s["latents"] for s in samples]) if cached else None,
        "images": None if cached else torch.stack([s["image"] for s in samples]),
        "captions": captions,
        "text": {k: torch.stack([torch.from_numpy(np.asarray(t[k])) for t in texts]) for k in texts[0]}
        if texts[0] is not None else None,
        "loss_weights": torch.tensor(weights, dtype=torch.float32),
        "alpha_masks": torch.stack(masks) if masks else None,
        "conditioning_images": torch.stack([s["conditioning"] for s in samples])
        if samples[0]["conditioning"] is not None else None,
        "network_multipliers": torch.tensor([item.subset.network_multiplier for item in items], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_hw"] for s in samples]),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples]),
        "target_sizes_hw": torch.tensor([(item.bucket[1], item.bucket[0]) for item in items]),
        "image_paths": [str(item.path) for item in items],
        "custom_attributes": [dict(item.subset.custom_attributes or {}) for item in items],
        "diff_output_preservation": torch.tensor([item.subset.diff_output_preservation for item in items]),
    }  # fmt: skip


def _cached_text(item: ImageItem) -> dict | None:
    if item.text is not None:
        return item.text
    if item.text_npz is not None:
        return load_text(item.text_npz, tuple(item.extra["text_keys"]))
    return None


def _sample(item: ImageItem, options: DatasetOptions, rng: random.Random) -> dict:
    subset = item.subset
    flip = subset.flip_aug and rng.random() < 0.5
    sample = {"latents": None, "image": None, "alpha": None, "conditioning": None,
              "original_hw": (item.size[1], item.size[0]), "hw": (item.bucket[1], item.bucket[0])}  # fmt: skip
    cached = item.latents
    if cached is None and item.latents_npz is not None:
        cached = load_latents(item.latents_npz, item.extra["latent_size"])
    if cached is not None:
        latents = cached.flipped if flip else cached.latents
        sample["latents"] = torch.from_numpy(np.ascontiguousarray(latents))
        if subset.alpha_mask and cached.alpha_mask is not None:
            mask = cached.alpha_mask[:, ::-1] if flip else cached.alpha_mask
            sample["alpha"] = torch.from_numpy(np.ascontiguousarray(mask))
        placement = _cached_placement(item, cached.crop_ltrb, flip)
    else:
        image = load_image(item.path, with_alpha=subset.alpha_mask)
        face = face_position(item.path) if subset.face_crop_aug_range and item.extra.get("face_crop") else None
        if face is not None:
            height, width = image.pixels.shape[:2]
            placement = face_placement((width, height), item.bucket, face, subset.face_crop_aug_range,
                                       random_crop=subset.random_crop, rng=rng, flip=flip)  # fmt: skip
        else:
            placement = bucket_placement(item.resized_size, item.bucket, random_crop=subset.random_crop, rng=rng,
                                         flip=flip)  # fmt: skip
        image = place(image, placement, subset.resize_interpolation)
        if subset.color_aug:
            image = color_augment(image, rng)
        sample["image"], sample["alpha"] = to_tensor(image)
    sample["crop_top_left"] = placement.crop_top_left
    if item.conditioning_path is not None:
        hint = place(load_image(item.conditioning_path), placement, subset.resize_interpolation)
        sample["conditioning"] = to_tensor(hint)[0]
    return sample


def _cached_placement(item: ImageItem, crop_ltrb: tuple[int, int, int, int], flip: bool) -> Placement:
    """Where the cached latents' image was cropped (their conditioning image is placed there too)."""
    left, top = crop_ltrb[:2]
    try:
        return Placement(item.resized_size, item.bucket, top, left, flip)
    except ValueError as e:
        raise UserError(f"the latent cache of {item.path} ({item.latents_npz or 'in memory'}) does not fit its bucket "
                        f"({e}); delete the cache file to encode it again") from None  # fmt: skip


def color_augment(image: LoadedImage, rng: random.Random) -> LoadedImage:
    """upstream's color_aug: a third of the time, either a hue shift of up to 8/180 of a turn or a gamma in
    [0.95, 1.05]."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = np.asarray(Image.fromarray(image.pixels).convert("HSV")).copy()
        shift = rng.uniform(-8, 8) / 180 * 256
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + shift) % 256).astype(np.uint8)
        pixels = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    else:
        gamma = rng.uniform(0.95, 1.05)
        pixels = np.clip(image.pixels.astype(np.float32) ** gamma, 0, 255).astype(np.uint8)
    return LoadedImage(pixels, image.alpha)
