"""FLUX.1 ControlNet training (XLabs layout). Options as upstream's script."""

from __future__ import annotations

from library.errors import run_cli
from library.logging_setup import setup_logging
from library.training.args import parse_args_with_config
from library.training.controlnet_training import build_controlnet_parser, run_controlnet_training
from library.training.families.flux import FLUX


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_controlnet_training(parse_args_with_config(build_controlnet_parser(FLUX, __doc__), argv), FLUX)


if __name__ == "__main__":
    run_cli(main)
