"""SD3/SD3.5 full fine-tuning. Options as upstream's script."""

from __future__ import annotations

from library.errors import run_cli
from library.logging_setup import setup_logging
from library.training.args import parse_args_with_config
from library.training.families.sd3 import SD3
from library.training.full_training import build_full_parser, run_full_training


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    run_full_training(parse_args_with_config(build_full_parser(SD3, __doc__), argv), SD3)


if __name__ == "__main__":
    run_cli(main)
