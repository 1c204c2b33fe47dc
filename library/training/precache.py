"""Filling the caches without training (tools/cache_latents.py, tools/cache_text_encoder_outputs.py).

The tools take the training command line unchanged, so a user can cache once with the exact options the run will
use; files are written as ``--cache_latents_to_disk`` / ``--cache_text_encoder_outputs_to_disk`` would write them.
"""

from __future__ import annotations

import argparse
import logging

import torch
from accelerate import Accelerator

from library.data.dataset import DatasetOptions, build_dataset_group
from library.data.encode_caches import check_latents_cacheable, check_text_cacheable
from library.errors import UserError
from library.training.families.flux import (
    FluxLatentCodec,
    FluxModelFiles,
    FluxTextCodec,
    FluxTextSettings,
    checkpoint_is_schnell,
    load_flux_ae,
    load_flux_text_encoder,
)  # fmt: skip

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _setup(args: argparse.Namespace, required: dict[str, str]) -> tuple[Accelerator, torch.dtype]:
    for option, what in required.items():
        if not getattr(args, option):
            raise UserError(f"--{option} is required ({what})")
    if args.seed is None:
        args.seed = 0
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    return accelerator, _DTYPES.get(args.mixed_precision, torch.float32)


def precache_latents(args: argparse.Namespace) -> int:
    """Encode every image of the dataset config into ``<stem>_<W>x<H>_flux.npz``; returns images encoded."""
    args.cache_latents_to_disk = True
    group = build_dataset_group(DatasetOptions.from_args(args))
    check_latents_cacheable(group.all_items())
    accelerator, dtype = _setup(args, {"ae": "the AE"})
    codec = FluxLatentCodec(load_flux_ae(args.ae, dtype=dtype, device=accelerator.device))
    encoded = group.cache_latents(codec, is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    logger.info("latent cache ready: %d images encoded, %d already cached", encoded, len(group.all_items()) - encoded)
    return encoded


def precache_text_encoder_outputs(args: argparse.Namespace) -> int:
    """Encode every caption into ``<stem>_flux_te.npz``; returns captions encoded."""
    args.cache_text_encoder_outputs_to_disk = True
    group = build_dataset_group(DatasetOptions.from_args(args))
    check_text_cacheable(group.all_items())
    required = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
    if args.t5xxl_max_token_length is None:
        required["pretrained_model_name_or_path"] = "the FLUX.1 checkpoint, to tell dev from schnell"
    accelerator, dtype = _setup(args, required)
    is_schnell = args.t5xxl_max_token_length is None and checkpoint_is_schnell(args.pretrained_model_name_or_path)
    files = FluxModelFiles(args.pretrained_model_name_or_path, args.clip_l, args.t5xxl, args.ae,
                           args.clip_l_tokenizer, args.t5xxl_tokenizer)  # fmt: skip
    text = load_flux_text_encoder(files, FluxTextSettings(args.t5xxl_max_token_length, args.apply_t5_attn_mask),
                                  dtype=dtype, device=accelerator.device, is_schnell=is_schnell)  # fmt: skip
    encoded = group.cache_text_encoder_outputs(FluxTextCodec(text), is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    logger.info("text-encoder output cache ready: %d captions encoded", encoded)
    return encoded
