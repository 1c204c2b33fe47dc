"""Load LDM-layout autoencoders from single files: BFL's ``ae.safetensors``, or the ``first_stage_model.``/``vae.``
part of a full checkpoint; fp32/bf16/fp16 files, and fp8 ones upcast.

The architecture is read off the tensor shapes, the model built on the meta device and the tensors assigned one
at a time. Missing, unexpected or mis-shaped keys, and files that are something else, are a one-line UserError.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

import torch

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, iter_tensors, read_header
from library.models.autoencoder.model import (
    FLUX1_SCALE_FACTOR,
    FLUX1_SHIFT_FACTOR,
    AutoEncoder,
    AutoEncoderParams,
)
from library.models.checkpoint_kind import describe_checkpoint

logger = logging.getLogger(__name__)

AUTOENCODER_PREFIXES = ("", "first_stage_model.", "vae.")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MARKER = "encoder.conv_in.weight"
_DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"


def _indices(header: SafetensorsHeader, stem: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(stem)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in header.keys() if (m := pattern.match(k))})


def detect_autoencoder_params(
    header: SafetensorsHeader,
    scale_factor: float,
    shift_factor: float,
    *,
    prefix: str = "",
    what: str | None = None,
) -> AutoEncoderParams:
    """Read the architecture off the tensor shapes under ``prefix``; the latent scaling is the caller's."""
    what = what or str(header.path)
    try:
        ch, in_channels = header.shape(f"{prefix}encoder.conv_in.weight")[:2]
        levels = _indices(header, f"{prefix}encoder.down")
        if levels != list(range(len(levels))):
            raise ValueError(f"encoder levels {levels} are not numbered 0..{len(levels) - 1}")
        ch_mult = []
        for level in levels:
            channels = header.shape(f"{prefix}encoder.down.{level}.block.0.conv2.weight")[0]
            if channels % ch:
                raise ValueError(f"encoder.down.{level} has {channels} channels, not a multiple of {ch}")
            ch_mult.append(channels // ch)
        return AutoEncoderParams(
            resolution=256,
            in_channels=in_channels,
            ch=ch,
            out_ch=header.shape(f"{prefix}decoder.conv_out.weight")[0],
            ch_mult=tuple(ch_mult),
            num_res_blocks=len(_indices(header, f"{prefix}encoder.down.0.block")),
            z_channels=header.shape(f"{prefix}decoder.conv_in.weight")[1],
            scale_factor=scale_factor,
            shift_factor=shift_factor,
            use_quant_conv=f"{prefix}quant_conv.weight" in header,
        )
    except KeyError as e:
        raise UserError(f"{what}: damaged autoencoder checkpoint, missing {e.args[0]}") from None
    except (ValueError, IndexError) as e:
        raise UserError(f"{what}: inconsistent autoencoder checkpoint ({e})") from None


def _find_prefix(header: SafetensorsHeader, candidates: Sequence[str], what: str) -> str:
    prefix = next((p for p in candidates if f"{p}{_MARKER}" in header), None)
    if prefix is None:
        raise UserError(f"{what}: expected an autoencoder (AE/VAE), found {describe_checkpoint(header)}")
    if f"{prefix}{_DIFFUSERS_MARKER}" in header:
        raise UserError(
            f"{what}: is an autoencoder in diffusers layout (encoder.down_blocks.*); "
            "use the single-file LDM layout (e.g. BFL's ae.safetensors)"
        )
    return prefix


def _names(keys: list[str], limit: int = 5) -> str:
    return f"{len(keys)} keys: {', '.join(keys[:limit])}{', ...' if len(keys) > limit else ''}"


def _loadable(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Same shape, or attention projections stored as Linear [C, C] for a 1x1 conv [C, C, 1, 1]."""
    return found == expected or (len(found) == 2 and expected == (*found, 1, 1))


def _check_keys(header: SafetensorsHeader, prefix: str, expected: dict[str, tuple[int, ...]], what: str) -> None:
    found = {k[len(prefix) :]: header.shape(k) for k in header.keys() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(k for k in set(found) & set(expected) if not _loadable(found[k], expected[k]))
    problems = []
    if missing:
        problems.append(f"missing {_names([prefix + k for k in missing])}")
    if unexpected:
        problems.append(f"unexpected {_names([prefix + k for k in unexpected])}")
    if misshaped:
        shown = ", ".join(f"{prefix}{k} {list(found[k])} (expected {list(expected[k])})" for k in misshaped[:5])
        problems.append(f"{len(misshaped)} with the wrong shape: {shown}")
    if problems:
        raise UserError(f"{what}: not a complete autoencoder checkpoint: {'; '.join(problems)}")


def load_autoencoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    option: str = "--ae",
    scale_factor: float = FLUX1_SCALE_FACTOR,
    shift_factor: float = FLUX1_SHIFT_FACTOR,
    prefix_candidates: Sequence[str] = AUTOENCODER_PREFIXES,
) -> AutoEncoder:
    """Load an LDM-layout autoencoder with every tensor in ``dtype`` (fp32, bf16 or fp16), frozen, in eval mode."""
    if dtype not in COMPUTE_DTYPES:
        raise UserError(f"{option}: the autoencoder runs in fp32, bf16 or fp16, not {dtype}")
    header = read_header(path, option)
    what = f"{option} {header.path}"
    prefix = _find_prefix(header, prefix_candidates, what)
    params = detect_autoencoder_params(header, scale_factor, shift_factor, prefix=prefix, what=what)
    with torch.device("meta"):
        model = AutoEncoder(params)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(header, prefix, expected, what)
    logger.info(
        "autoencoder from %s: %d-channel latents, ch %d x %s, %d res blocks, prefix %r, file dtypes %s",
        header.path, params.z_channels, params.ch, params.ch_mult, params.num_res_blocks, prefix,
        ",".join(sorted(header.dtypes())),
    )  # fmt: skip
    state = {}
    for file_key, tensor in iter_tensors(header.path, [prefix + k for k in expected], device):
        key = file_key[len(prefix) :]
        state[key] = tensor.reshape(expected[key]).to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def make_tiny_autoencoder_state_dict(
    ch: int = 32,
    ch_mult: Sequence[int] = (1, 1, 1, 1),
    num_res_blocks: int = 1,
    z_channels: int = 16,
    seed: int = 0,
    use_quant_conv: bool = False,
) -> dict[str, torch.Tensor]:
    """Random fp32 weights in the real layout. Norm scales and biases differ from their defaults so a swapped or
    skipped tensor changes the output; convs are scaled by 1/sqrt(fan_in) to keep activations O(1)."""
    params = AutoEncoderParams(
        resolution=256, in_channels=3, ch=ch, out_ch=3, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
        z_channels=z_channels, scale_factor=FLUX1_SCALE_FACTOR, shift_factor=FLUX1_SHIFT_FACTOR,
        use_quant_conv=use_quant_conv,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoEncoder(params)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=generator)
        if meta.ndim == 1:
            is_norm_scale = key.endswith(".weight")
            state[key] = 1.0 + 0.2 * noise if is_norm_scale else 0.05 * noise
        else:
            state[key] = noise / meta[0].numel() ** 0.5
    return state
