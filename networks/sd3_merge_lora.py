"""Merge SD3/SD3.5 LoRAs into an SD3/SD3.5 model and its text encoders, or into one LoRA.

Into models: --sd3_model (SAI single file or bare MMDiT; CLIP-L/CLIP-G/T5-XXL bundled in it are merged too, the
VAE is kept), --clip_l, --clip_g, --t5xxl, each written to its ``..._save_to`` in its own dtype (fp8 included)
unless --save_precision says otherwise, tensor by tensor. LoRAs in sd-scripts or diffusers/PEFT keys.
Without a model: the LoRAs become one LoRA whose delta is exactly the sum of ratio x delta of each.

    python networks/sd3_merge_lora.py --sd3_model sd3.5_large.safetensors --save_to merged.safetensors \\
        --models a.safetensors --ratios 1.0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from networks.lora_tools.cli import merge_main, merge_parser  # noqa: E402
from networks.lora_tools.families import SD3  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    return merge_parser(SD3, __doc__)


def main(argv: list[str] | None = None) -> None:
    merge_main(SD3, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
