"""Filling the caches without training (tools/cache_latents.py, tools/cache_text_encoder_outputs.py).

The tools take the training command line unchanged, so a user can cache once with the exact options the run will
use; files are written as ``--cache_latents_to_disk`` / ``--cache_text_encoder_outputs_to_disk`` would write them.
"""

from __future__ import annotations

import argparse
import logging

from accelerate import Accelerator
from accelerate.utils import set_seed

from library.data.dataset import DatasetOptions, build_dataset_groups
from library.data.encode_caches import Shard, check_latents_cacheable, check_text_cacheable
from library.training import session
from library.training.family import FamilySpec, LoadOptions

logger = logging.getLogger(__name__)


def _setup(args: argparse.Namespace) -> tuple[Accelerator, LoadOptions]:
    if args.seed is None:
        args.seed = 0
    set_seed(args.seed)  # latents are drawn from the VAE posterior: the same seed caches the same latents
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    options = LoadOptions(dtype=session.weight_dtype(args), device=accelerator.device,
                          latent_samples=not args.vae_latent_mean)  # fmt: skip
    return accelerator, options


def _groups(args: argparse.Namespace) -> list:
    """The training images and the ones held out for validation: both are cached."""
    group, held_out = build_dataset_groups(DatasetOptions.from_args(args))
    return [group] if held_out is None else [group, held_out]


def precache_latents(args: argparse.Namespace, spec: FamilySpec) -> int:
    """Encode every image of the dataset into the family's latent cache files; returns images encoded."""
    args.cache_latents_to_disk = True
    groups = _groups(args)
    items = sum(len(g.all_items()) for g in groups)
    check_latents_cacheable([item for g in groups for item in g.all_items()])
    accelerator, options = _setup(args)
    codec = spec.load_latent_codec(args, options)
    encoded = sum(g.cache_latents(codec, shard=Shard(accelerator.process_index, accelerator.num_processes)) for g in groups)
    accelerator.wait_for_everyone()
    logger.info("latent cache ready: %d images encoded, %d already cached", encoded, items - encoded)
    return encoded


def precache_text_encoder_outputs(args: argparse.Namespace, spec: FamilySpec) -> int:
    """Encode every caption into the family's text-encoder cache files; returns captions encoded."""
    args.cache_text_encoder_outputs_to_disk = True
    groups = _groups(args)
    check_text_cacheable([item for g in groups for item in g.all_items()])
    accelerator, options = _setup(args)
    codec = spec.load_text_codec(args, options)
    encoded = sum(g.cache_text_encoder_outputs(codec, shard=Shard(accelerator.process_index, accelerator.num_processes)) for g in groups)
    accelerator.wait_for_everyone()
    logger.info("text-encoder output cache ready: %d captions encoded", encoded)
    return encoded
