"""Write tiny random checkpoints in the real single-file layouts, for the quick start, the tests and benchmarks:
the FLUX.1 set (BFL transformer dev and schnell, AE, CLIP-L, T5-XXL) and, with ``--family sd3`` or ``all``, the
SD3/SD3.5 set (see ``make_tiny_sd3_set``). Real head dims (FLUX 128, MMDiT/CLIP/T5 64) and real vocabularies,
so detection and tokenizers behave as with real files."""

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
from library.models.checkpoint_kind import DIFFUSION_MODEL_PREFIX, SD3_EMBEDDED_ENCODERS, SD3_VAE_PREFIX  # noqa: E402
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params  # noqa: E402
from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params  # noqa: E402
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
        _save(make(), paths[role], role, dtype)
    return paths


def _save(state: dict[str, torch.Tensor], path: Path, role: str, dtype: torch.dtype) -> None:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_save_file(state, path, metadata={"format": "pt", "tiny_model": role})
    logger.info("wrote %s (%d tensors)", path, len(state))


SD3_FILES = {
    "sd3_medium": "sd3_medium-tiny.safetensors",
    "sd3_medium_incl_clips": "sd3_medium_incl_clips-tiny.safetensors",
    "sd3_medium_incl_t5": "sd3_medium_incl_clips_t5xxl-tiny.safetensors",
    "sd3_medium_mmdit_only": "sd3_medium_mmdit_only-tiny.safetensors",
    "sd3_5_medium": "sd3.5_medium-tiny.safetensors",
    "sd3_5_large": "sd3.5_large-tiny.safetensors",
    "vae": "sd3_vae-tiny.safetensors",
    "clip_l": "clip_l-tiny.safetensors",
    "clip_g": "clip_g-tiny.safetensors",
    "t5xxl": "t5xxl_sd3-tiny.safetensors",
}


def _prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def make_tiny_sd3_set(
    out_dir: Path,
    *,
    depth: int = 2,
    clip_l_width: int = 128,
    clip_g_width: int = 192,
    t5_width: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the tiny SD3/SD3.5 checkpoints into ``out_dir``; returns their paths by role:

    - ``sd3_medium``: MMDiT ``model.diffusion_model.*`` + VAE ``first_stage_model.*`` (as sd3_medium.safetensors)
    - ``sd3_medium_incl_clips``: the same + ``text_encoders.clip_l.transformer.*`` and ``...clip_g.transformer.*``
    - ``sd3_medium_incl_t5``: the same + ``text_encoders.t5xxl.transformer.*``
    - ``sd3_medium_mmdit_only``: the same MMDiT with bare keys, no VAE (needs ``--vae``)
    - ``sd3_5_medium``: qk-norm, attn2 in block 0, position table 64 (the others 32); MMDiT + VAE
    - ``sd3_5_large``: qk-norm, no attn2; MMDiT + VAE
    - ``vae``: a separate SD3 VAE (bare keys) for ``--vae``
    - ``clip_l``: CLIP-L width 128, no projection (the FLUX set's file); ``clip_g``: CLIP-G width 192 with
      ``text_projection.weight``; ``t5xxl``: T5 width 384 (by default CLIP-L + CLIP-G + 64, so the zero padding
      of the CLIP hidden states to the T5 width is real)

    MMDiT widths follow SD3 conditioning: context = T5 width, pooled = CLIP-L + CLIP-G projections. The VAE and
    text encoders bundled in the checkpoints have other random weights than the separate files, so a test can
    tell which copy was used.
    """
    t5_width = t5_width or clip_l_width + clip_g_width + 64
    if t5_width < clip_l_width + clip_g_width:
        raise ValueError(f"T5 width {t5_width} must hold CLIP-L + CLIP-G ({clip_l_width} + {clip_g_width})")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: out_dir / name for role, name in SD3_FILES.items()}
    widths = dict(depth=depth, context_in_dim=t5_width, adm_in_dim=clip_l_width + clip_g_width)

    def mmdit(variant: str, offset: int) -> dict[str, torch.Tensor]:
        return make_sd3_state_dict(tiny_sd3_params(variant, **widths), seed=seed + offset)

    def clip_g(offset: int) -> dict[str, torch.Tensor]:
        return make_tiny_clip_state_dict(clip_g_width, intermediate=2 * clip_g_width, with_projection=True,
                                         seed=seed + offset)  # fmt: skip

    def vae(offset: int) -> dict[str, torch.Tensor]:
        return make_tiny_autoencoder_state_dict(seed=seed + offset)

    def t5(offset: int) -> dict[str, torch.Tensor]:
        return make_tiny_t5_state_dict(d_model=t5_width, d_ff=2 * t5_width, num_heads=t5_width // 64,
                                       seed=seed + offset)  # fmt: skip

    encoder_prefix = {name: prefix for name, (prefix, _) in SD3_EMBEDDED_ENCODERS.items()}
    medium = mmdit("medium", 0)
    vae_part = _prefixed(SD3_VAE_PREFIX, vae(10))
    packaged = {**_prefixed(DIFFUSION_MODEL_PREFIX, medium), **vae_part}
    clips = {
        **_prefixed(encoder_prefix["clip_l"], make_tiny_clip_state_dict(hidden=clip_l_width, seed=seed + 20)),
        **_prefixed(encoder_prefix["clip_g"], clip_g(21)),
    }
    parts = {
        "sd3_medium": lambda: packaged,
        "sd3_medium_incl_clips": lambda: {**packaged, **clips},
        "sd3_medium_incl_t5": lambda: {**packaged, **clips, **_prefixed(encoder_prefix["t5xxl"], t5(22))},
        "sd3_medium_mmdit_only": lambda: medium,
        "sd3_5_medium": lambda: {**_prefixed(DIFFUSION_MODEL_PREFIX, mmdit("5-medium", 1)), **vae_part},
        "sd3_5_large": lambda: {**_prefixed(DIFFUSION_MODEL_PREFIX, mmdit("5-large", 2)), **vae_part},
        "vae": lambda: vae(11),
        "clip_l": lambda: make_tiny_clip_state_dict(hidden=clip_l_width, seed=seed),
        "clip_g": lambda: clip_g(1),
        "t5xxl": lambda: t5(2),
    }
    for role, make in parts.items():
        _save(make(), paths[role], role, dtype)
    return paths


def main() -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default="tiny_models", help="folder for the checkpoints")
    parser.add_argument("--family", choices=("flux", "sd3", "all"), default="flux", help="which set to write")
    parser.add_argument("--hidden_size", type=int, default=256, help="FLUX width (a multiple of 128)")
    parser.add_argument("--depth", type=int, default=2, help="FLUX double blocks")
    parser.add_argument("--depth_single_blocks", type=int, default=2, help="FLUX single blocks")
    parser.add_argument("--text_width", type=int, default=128, help="CLIP-L/T5 width (a multiple of 64)")
    parser.add_argument("--sd3_depth", type=int, default=2, help="SD3 MMDiT depth (hidden 64 * depth)")
    parser.add_argument("--save_precision", default="fp32", help="fp32, fp16, bf16 or fp8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtype = parse_dtype(args.save_precision, "--save_precision")
    if args.family in ("flux", "all"):
        make_tiny_flux_set(
            Path(args.output_dir), hidden_size=args.hidden_size, depth=args.depth,
            depth_single_blocks=args.depth_single_blocks, text_width=args.text_width, dtype=dtype, seed=args.seed,
        )  # fmt: skip
    if args.family in ("sd3", "all"):
        make_tiny_sd3_set(
            Path(args.output_dir), depth=args.sd3_depth, clip_l_width=args.text_width, dtype=dtype, seed=args.seed
        )


if __name__ == "__main__":
    run_cli(main)
