"""Assemble Stability AI's single-file SD3/SD3.5 checkpoint from its parts (upstream's options): the MMDiT under
``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoders under
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.``, as sd3_medium_incl_clips_t5xxlfp16.safetensors holds them.

Each input is checked for what it must be (an SD3 MMDiT, a 16-channel VAE, CLIP-L, CLIP-G with its projection,
T5-XXL) before anything is written. Keys that already carry their part's prefix keep it; a CLIP file without the
``text_model.`` level gets it. A part given on the command line replaces the same part inside ``--dit``. The DiT's
metadata is copied. Tensors are streamed to the output one at a time (cast to ``--save_precision`` if given), and
the output appears only when complete.

    python tools/merge_sd3_safetensors.py --dit sd3.5_large.safetensors --clip_l clip_l.safetensors \
        --clip_g clip_g.safetensors --t5xxl t5xxl_fp16.safetensors --output sd3.5_large_incl_encoders.safetensors
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from library.dtypes import parse_dtype  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.io.safetensors_file import SafetensorsHeader, read_header  # noqa: E402
from library.io.safetensors_stream import PendingTensor, mem_eff_save_file  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.models.checkpoint_kind import (  # noqa: E402
    DIFFUSION_MODEL_PREFIX,
    SD3_EMBEDDED_ENCODERS,
    SD3_VAE_PREFIX,
    describe_checkpoint,
    find_clip_layout,
)
from library.models.sd3.loading import open_sd3_checkpoint  # noqa: E402
from networks.convert_lora_common import check_device, check_output_path  # noqa: E402

logger = logging.getLogger(__name__)

ENCODER_PREFIXES = {name: prefix for name, (prefix, _) in SD3_EMBEDDED_ENCODERS.items()}
SD3_LATENT_CHANNELS = 16
CLIP_WIDTHS = {"clip_l": 768, "clip_g": 1280}  # the real encoders' widths (tiny test models have others)
PROJECTION = "text_projection.weight"
T5_PROBES = ("encoder.block.0.layer.0.SelfAttention.q.weight",
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")  # fmt: skip


@dataclass(frozen=True)
class Source:
    """One output tensor: where it is read from."""

    path: Path
    key: str


def _strip(header: SafetensorsHeader, prefix: str) -> dict[str, str]:
    return {k: k[len(prefix) :] for k in header.keys() if k.startswith(prefix)}


def dit_part(path: Path) -> tuple[dict[str, Source], dict[str, str]]:
    """The MMDiT under ``model.diffusion_model.`` plus whatever else the file holds (VAE, encoders) as it is;
    and the file's metadata."""
    checkpoint = open_sd3_checkpoint(path, "--dit")
    mmdit = set(checkpoint.mmdit_keys())
    prefix = checkpoint.prefix
    out = {}
    for key in checkpoint.header.keys():
        name = DIFFUSION_MODEL_PREFIX + key[len(prefix) :] if key in mmdit else key
        out[name] = Source(path, key)
    logger.info(f"--dit {path}: {checkpoint.description}")
    return out, checkpoint.header.metadata


def vae_part(path: Path) -> dict[str, Source]:
    header = read_header(path, "--vae")
    prefix = next((p for p in (SD3_VAE_PREFIX, "vae.", "") if f"{p}encoder.conv_in.weight" in header
                   and f"{p}decoder.conv_in.weight" in header), None)  # fmt: skip
    if prefix is None:
        raise UserError(f"--vae {path}: expected an SD3 VAE, found {describe_checkpoint(header)}")
    channels = header.shape(f"{prefix}decoder.conv_in.weight")[1]
    if channels != SD3_LATENT_CHANNELS:
        raise UserError(f"--vae {path}: expected SD3's 16-channel VAE, found a {channels}-channel autoencoder "
                        "(an SD1/SDXL VAE?)")  # fmt: skip
    return {SD3_VAE_PREFIX + name: Source(path, key) for key, name in _strip(header, prefix).items()}


def clip_part(path: Path, name: str) -> dict[str, Source]:
    """CLIP-L or CLIP-G under its prefix, with the ``text_model.`` level the SAI file has."""
    option, target = f"--{name}", ENCODER_PREFIXES[name]
    header = read_header(path, option)
    outer = target if any(k.startswith(target) for k in header.keys()) else ""
    layout = find_clip_layout(header, outer)
    title = name.replace("clip_", "CLIP-").upper()
    if layout is None:
        raise UserError(f"{option} {path}: expected a {title} text encoder, found {describe_checkpoint(header)}")
    width = header.shape(f"{layout}encoder.layers.0.self_attn.q_proj.weight")[0]
    other = next((n for n, w in CLIP_WIDTHS.items() if w == width and n != name), None)
    if other:
        found = other.replace("clip_", "CLIP-").upper()
        raise UserError(f"{option} {path}: expected a {title} text encoder, found {found} (width {width}); "
                        f"give it to --{other}")  # fmt: skip
    if name == "clip_g" and f"{outer}{PROJECTION}" not in header:
        raise UserError(f"{option} {path}: CLIP-G without {PROJECTION}; SD3 needs it, use the complete clip_g file")
    out = {}
    for key in header.keys():
        if key == f"{outer}{PROJECTION}":
            out[target + PROJECTION] = Source(path, key)
        elif key.startswith(layout):
            out[target + "text_model." + key[len(layout) :]] = Source(path, key)
    return out


def t5_part(path: Path) -> dict[str, Source]:
    target = ENCODER_PREFIXES["t5xxl"]
    header = read_header(path, "--t5xxl")
    outer = target if any(k.startswith(target) for k in header.keys()) else ""
    if not all(outer + probe in header for probe in T5_PROBES):
        raise UserError(f"--t5xxl {path}: expected a T5-XXL text encoder, found {describe_checkpoint(header)}")
    return {target + name: Source(path, key) for key, name in _strip(header, outer).items()}


def _replace(merged: dict[str, Source], part: dict[str, Source], prefix: str, what: str) -> None:
    """Add ``part``; what ``merged`` already held under its prefix (from --dit) is dropped."""
    old = [k for k in merged if k.startswith(prefix)]
    if old:
        logger.info(f"{what} replaces the {len(old)} tensors under {prefix} in --dit")
    for key in old:
        del merged[key]
    merged.update(part)


def plan_merge(dit: Path, vae: Path | None = None, clip_l: Path | None = None, clip_g: Path | None = None,
               t5xxl: Path | None = None) -> tuple[dict[str, Source], dict[str, str]]:  # fmt: skip
    """Every output key and where it comes from, and the metadata; every input is checked first."""
    merged, metadata = dit_part(dit)
    if vae is not None:
        _replace(merged, vae_part(vae), SD3_VAE_PREFIX, f"--vae {vae}")
    for name, path in (("clip_l", clip_l), ("clip_g", clip_g)):
        if path is not None:
            _replace(merged, clip_part(path, name), ENCODER_PREFIXES[name], f"--{name} {path}")
    if t5xxl is not None:
        _replace(merged, t5_part(t5xxl), ENCODER_PREFIXES["t5xxl"], f"--t5xxl {t5xxl}")
    return merged, metadata


def merge(plan: dict[str, Source], metadata: dict[str, str], output: Path, dtype: torch.dtype | None,
          device: str = "cpu") -> None:  # fmt: skip
    """Stream the planned tensors into ``output`` (float tensors cast to ``dtype`` when given)."""
    headers = {path: read_header(path) for path in {s.path for s in plan.values()}}
    with contextlib.ExitStack() as stack:
        files = {path: stack.enter_context(safe_open(str(path), "pt", device=device)) for path in headers}
        items = []
        for name, source in plan.items():
            info = headers[source.path].tensors[source.key]
            stored = info.torch_dtype
            if stored is None:
                raise UserError(f"{source.path}: tensor {source.key} has dtype {info.dtype}, which is not supported")
            target = dtype if dtype is not None and stored.is_floating_point else stored

            def make(f=files[source.path], key=source.key, target=target) -> torch.Tensor:
                return f.get_tensor(key).to(target)

            items.append((name, PendingTensor(info.shape, target, make)))
        mem_eff_save_file(items, output, metadata or None)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit", required=True, help="the SD3/SD3.5 MMDiT (bare, or a single file with more parts)")
    parser.add_argument("--vae", help="the VAE; may be left out when --dit holds one")
    parser.add_argument("--clip_l", help="the CLIP-L text encoder")
    parser.add_argument("--clip_g", help="the CLIP-G text encoder (with its text_projection)")
    parser.add_argument("--t5xxl", help="the T5-XXL text encoder")
    parser.add_argument("--output", default="merged_model.safetensors", help="the single file to write")
    parser.add_argument("--device", default="cpu", help="where tensors are read and cast (default: cpu)")
    parser.add_argument("--save_precision", default=None, help="fp32, fp16, bf16 or fp8 (default: as stored)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)
    output = Path(args.output)
    check_output_path(output, args.overwrite, "--output")
    dtype = parse_dtype(args.save_precision, "--save_precision")
    device = check_device(args.device)
    paths = {k: Path(v) if v else None for k, v in vars(args).items() if k in ("vae", "clip_l", "clip_g", "t5xxl")}
    plan, metadata = plan_merge(Path(args.dit), **paths)
    merge(plan, metadata, output, dtype, device)
    logger.info(f"wrote {len(plan)} tensors to {output}")


if __name__ == "__main__":
    run_cli(main)
