"""Convert a FLUX.1 transformer from diffusers' layout (a folder, its transformer/ folder, a sharded
``-00001-of-0000N`` file or a single file) to one BFL-layout single file. Options as upstream's tool."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm import tqdm  # noqa: E402

from library.dtypes import parse_dtype  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.io.safetensors_file import atomic_save_file  # noqa: E402
from library.io.tensor_source import load_recipes  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.models.flux.loading import open_flux_checkpoint  # noqa: E402

logger = logging.getLogger(__name__)


def convert(diffusers_path: Path, save_to: Path, save_precision: str | None) -> None:
    checkpoint = open_flux_checkpoint(diffusers_path, option="--diffusers_path")
    if checkpoint.layout != "diffusers":
        raise UserError(f"--diffusers_path {diffusers_path}: already in {checkpoint.layout} layout; nothing to convert")
    dtype = parse_dtype(save_precision, "--save_precision")

    def dtype_for(key: str):
        return dtype or checkpoint.source.info(checkpoint.recipes[key].sources[0]).torch_dtype

    with checkpoint.source, tqdm(total=len(checkpoint.recipes), desc="converting", unit="tensor") as bar:
        state = load_recipes(checkpoint.recipes, checkpoint.source, dtype_for, progress=bar.update)
    atomic_save_file(state, save_to, metadata={"format": "pt"})
    logger.info("saved FLUX.1 %s (%d tensors) to %s", checkpoint.params.variant, len(state), save_to)


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--diffusers_path", required=True, help="diffusers folder, transformer/ folder or 00001 shard")
    parser.add_argument("--save_to", required=True, help="output .safetensors file")
    parser.add_argument(
        "--mem_eff_load_save", action="store_true",
        help="accepted for compatibility: conversion always reads one tensor at a time",
    )  # fmt: skip
    parser.add_argument("--save_precision", default=None, help="fp32, fp16, bf16 or fp8 (default: as stored)")
    args = parser.parse_args()
    convert(Path(args.diffusers_path), Path(args.save_to), args.save_precision)


if __name__ == "__main__":
    run_cli(main)
