"""Extract a LoRA from the difference between an original and a tuned FLUX.1 model (SVD per layer), with
upstream's options: every layer a FLUX.1 LoRA trains (double/single blocks and the input embedders), in any
layout (BFL, ``model.diffusion_model.``-prefixed, diffusers), and CLIP-L / T5-XXL with --clip_l_org/--clip_l_tuned
and --t5xxl_org/--t5xxl_tuned.

    python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned my_finetune.safetensors \\
        --save_to my_lora.safetensors --dim 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from networks.lora_tools.cli import extract_main, extract_parser  # noqa: E402
from networks.lora_tools.families import FLUX  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    return extract_parser(FLUX, __doc__)


def main(argv: list[str] | None = None) -> None:
    extract_main(FLUX, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
