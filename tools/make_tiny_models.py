"""Write tiny random FLUX.1 checkpoints in the real single-file layouts (BFL transformer dev and schnell, AE,
CLIP-L, T5-XXL), for the quick start, the tests and benchmarks. Real head dims (FLUX 128, CLIP/T5 64) and
real vocabularies, so detection and tokenizers behave as with real files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from library.dtypes import parse_dtype  # noqa: E402
from library.errors import run_cli  # noqa: E402
from library.io.safetensors_file import atomic_save_file  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.models.autoencoder.loading import make_tiny_autoencoder_state_dict  # noqa: E402
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params  # noqa: E402
from library.models.text_encoders.clip import make_tiny_clip_state_dict  # noqa: E402
from library.models.text_encoders.t5 import make_tiny_t5_state_dict  # noqa: E402

logger = logging.getLogger(__name__)

FILES = {
    "flux_dev": "flux1-dev-tiny.safetensors",
    "flux_schnell": "flux1-schnell-tiny.safetensors",
    "ae": "ae-tiny.safetensors",
    "clip_l": "clip_l-tiny.safetensors",
    "t5xxl": "t5xxl-tiny.safetensors",
}


def make_tiny_flux_set(
    out_dir: Path,
    *,
    hidden_size: int = 256,
    depth: int = 2,
    depth_single_blocks: int = 2,
    text_width: int = 128,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the five tiny checkpoints into ``out_dir``; returns their paths by role."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: out_dir / name for role, name in FILES.items()}

    def flux(guidance: bool) -> dict[str, torch.Tensor]:
        params = tiny_flux_params(
            hidden_size=hidden_size, depth=depth, depth_single_blocks=depth_single_blocks,
            vec_in_dim=text_width, context_in_dim=text_width, guidance_embed=guidance,
        )  # fmt: skip
        return make_flux_state_dict(params, seed=seed)

    parts = {
        "flux_dev": lambda: flux(True),
        "flux_schnell": lambda: flux(False),
        "ae": lambda: make_tiny_autoencoder_state_dict(seed=seed),
        "clip_l": lambda: make_tiny_clip_state_dict(hidden=text_width, seed=seed),
        "t5xxl": lambda: make_tiny_t5_state_dict(d_model=text_width, seed=seed),
    }
    for role, make in parts.items():
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make().items()}
        atomic_save_file(state, paths[role], metadata={"format": "pt", "tiny_model": role})
        logger.info("wrote %s (%d tensors)", paths[role], len(state))
    return paths


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="tiny_models", help="folder for the checkpoints")
    parser.add_argument("--hidden_size", type=int, default=256, help="FLUX width (a multiple of 128)")
    parser.add_argument("--depth", type=int, default=2, help="FLUX double blocks")
    parser.add_argument("--depth_single_blocks", type=int, default=2, help="FLUX single blocks")
    parser.add_argument("--text_width", type=int, default=128, help="CLIP-L/T5 width (a multiple of 64)")
    parser.add_argument("--save_precision", default="fp32", help="fp32, fp16, bf16 or fp8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_tiny_flux_set(
        Path(args.output_dir), hidden_size=args.hidden_size, depth=args.depth,
        depth_single_blocks=args.depth_single_blocks, text_width=args.text_width,
        dtype=parse_dtype(args.save_precision, "--save_precision"), seed=args.seed,
    )  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
