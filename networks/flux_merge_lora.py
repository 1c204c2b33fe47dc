"""Merge FLUX.1 LoRAs into a FLUX.1 model and its text encoders, or into one LoRA, with upstream's options.

Into models: --flux_model (BFL, ``model.diffusion_model.``-prefixed or diffusers layout; CLIP-L/T5-XXL bundled in
the file included), --clip_l, --t5xxl, each written to its ``..._save_to`` in its own dtype (fp8 included) unless
--save_precision says otherwise, tensor by tensor. LoRAs in sd-scripts or diffusers/PEFT keys.
Without a model: the LoRAs become one LoRA whose delta is exactly the sum of ratio x delta of each.

    python networks/flux_merge_lora.py --flux_model flux1-dev.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    python networks/flux_merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors --ratios 0.8 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from networks.lora_tools.cli import merge_main, merge_parser  # noqa: E402
from networks.lora_tools.families import FLUX  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    return merge_parser(FLUX, __doc__)


def main(argv: list[str] | None = None) -> None:
    merge_main(FLUX, __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
