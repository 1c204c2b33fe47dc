"""Extract a LoRA from the difference between an original and a tuned SD3/SD3.5 model (SVD per layer): every
layer an SD3 LoRA trains (joint blocks and the embedders, the 2x2 patch-embedding conv at --conv_dim), bare or
SAI single files, and the text encoders either bundled in both files or given with --clip_l_org/--clip_l_tuned,
--clip_g_org/--clip_g_tuned and --t5xxl_org/--t5xxl_tuned.

    python networks/sd3_extract_lora.py --model_org sd3.5_medium.safetensors --model_tuned my_finetune.safetensors \\
        --save_to my_lora.safetensors --dim 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from networks.lora_tools.cli import extract_main, extract_parser  # noqa: E402
from networks.lora_tools.families import SD3  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    return extract_parser(SD3, __doc__)


def main(argv: list[str] | None = None) -> None:
    extract_main(SD3, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
