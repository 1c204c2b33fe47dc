"""Cache the CLIP-L/T5-XXL outputs of a dataset's captions to disk before training (upstream's tools/cache_text_encoder_outputs.py).

Takes the same options as flux_train_network.py (or, with --sd3, as sd3_train_network.py); only the dataset and
encoder options are used.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.training.args import parse_args_with_config  # noqa: E402
from library.training.families import family_from_argv  # noqa: E402
from library.training.network_training import build_network_parser  # noqa: E402
from library.training.precache import precache_text_encoder_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    spec, argv = family_from_argv(sys.argv[1:] if argv is None else argv)
    parser = build_network_parser(spec, __doc__)
    precache_text_encoder_outputs(parse_args_with_config(parser, argv), spec)


if __name__ == "__main__":
    run_cli(main)
