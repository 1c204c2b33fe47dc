"""Generate an image with FLUX.1 (dev or schnell) from single-file checkpoints. Options as upstream's script."""

from __future__ import annotations

import argparse

from library.errors import run_cli
from library.inference.flux_cli import build_parser, run_flux_inference
from library.logging_setup import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_flux_inference(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
