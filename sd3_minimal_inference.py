"""Generate an image with SD3/SD3.5 (Medium, Large, Large Turbo) from single-file checkpoints. Options as upstream's
script, plus --vae for checkpoints without one."""

from __future__ import annotations

import argparse

from library.errors import run_cli
from library.inference.sd3_cli import build_parser, run_sd3_inference
from library.logging_setup import setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser(__doc__).parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_sd3_inference(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
