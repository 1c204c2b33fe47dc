"""Load and save FLUX.1 ControlNets as single files in XLabs' layout (bare keys, BFL block names): what upstream's
``flux_train_control_net.py`` writes, XLabs releases, and x-flux and ComfyUI load.

The architecture (depth, width, dev or schnell guidance) is read off the tensors; the model is built on the meta
device and the tensors assigned, strictly: a missing, unexpected or wrongly shaped key is one error naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, iter_tensors, read_header
from library.io.safetensors_stream import save_state
from library.models.checkpoint_kind import describe_checkpoint
from library.models.flux.controlnet import ControlNetParams, FluxControlNet
from library.models.flux.loading import FP8_DTYPE, detect_flux_params
from library.models.flux.model import FluxParams
from library.models.state_loading import check_state_keys

logger = logging.getLogger(__name__)

XLABS_MARKERS = ("controlnet_blocks.0.weight", "double_blocks.0.img_attn.norm.key_norm.scale")  # as ComfyUI detects
_SHAPE_KEYS = ("img_in.weight", "vector_in.in_layer.weight", "txt_in.weight", "double_blocks.0.img_mlp.0.weight",
               "double_blocks.0.img_attn.norm.query_norm.scale")  # fmt: skip


def _found(header: SafetensorsHeader) -> str:
    if "controlnet_x_embedder.weight" in header:
        union = " (Union)" if "controlnet_mode_embedder.weight" in header else ""
        return f"a FLUX ControlNet in diffusers' layout{union}, which this suite cannot read"
    return describe_checkpoint(header)


def detect_controlnet_params(shapes: Mapping[str, tuple[int, ...]], what: str) -> ControlNetParams:
    """Read the architecture off XLabs-layout tensor shapes."""
    missing = [key for key in _SHAPE_KEYS if key not in shapes]
    if missing:
        raise UserError(f"{what}: damaged FLUX.1 ControlNet, missing {', '.join(missing)}")
    hidden, in_channels = shapes["img_in.weight"]
    # a ControlNet has no final layer; its output width would be its input's, as upstream's has it
    base = detect_flux_params({**shapes, "final_layer.linear.weight": (in_channels, hidden)}, what)
    if base.depth_single_blocks:
        raise UserError(
            f"{what}: a ControlNet with {base.depth_single_blocks} single blocks, which cannot run (upstream adds "
            "the double blocks' samples through them); only double-block ControlNets are supported"
        )
    return ControlNetParams(base, depth=base.depth)


def open_flux_controlnet(
    path: str | os.PathLike, option: str = "--controlnet_model_name_or_path"
) -> tuple[SafetensorsHeader, ControlNetParams]:
    """Read the header, check it holds a complete XLabs-layout ControlNet and read its architecture; loads nothing."""
    header = read_header(path, option)
    what = f"{option} {path}"
    if not all(key in header for key in XLABS_MARKERS):
        raise UserError(f"{what}: expected a FLUX.1 ControlNet in XLabs' layout, found {_found(header)}")
    shapes = {key: header.shape(key) for key in header.keys()}
    params = detect_controlnet_params(shapes, what)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in FluxControlNet(params).state_dict().items()}
    check_state_keys(shapes, expected, what, "FLUX.1 ControlNet")
    return header, params


def check_controlnet_fits(params: ControlNetParams, base: FluxParams, what: str) -> None:
    """UserError when the ControlNet ``what`` was made for a FLUX.1 of other widths than ``base``."""
    mismatches = params.mismatches(base)
    if mismatches:
        raise UserError(f"{what}: made for another FLUX.1 model ({'; '.join(mismatches)}: ControlNet vs base model)")


def load_flux_controlnet(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    option: str = "--controlnet_model_name_or_path",
) -> FluxControlNet:
    """Load an XLabs-layout ControlNet (ours, upstream's or XLabs' releases) with every tensor in ``dtype``; in
    eval mode without gradients, as the base model loads (a trainer turns them on)."""
    if dtype == FP8_DTYPE:
        raise UserError(f"{option}: a ControlNet computes in bf16/fp16/fp32, not fp8")
    header, params = open_flux_controlnet(path, option)
    logger.info(
        "FLUX.1 ControlNet (%s) from %s: %d double blocks, hidden %d, file dtypes %s", params.base.variant,
        Path(path), params.depth, params.base.hidden_size, ",".join(sorted(header.dtypes())),
    )  # fmt: skip
    with torch.device("meta"):
        model = FluxControlNet(params)
    state = {key: tensor.to(dtype) for key, tensor in iter_tensors(header.path, header.keys(), device)}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def save_flux_controlnet(
    model: FluxControlNet,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    metadata: Mapping[str, str] | None,
    mem_eff: bool = False,
) -> None:
    """Save ``model`` with XLabs' keys, atomically, every tensor in ``dtype`` (None keeps each tensor's own);
    ``metadata`` is the caller's modelspec/ss_* dict; ``mem_eff`` streams (``--mem_eff_save``)."""
    if not isinstance(model, FluxControlNet):
        raise TypeError(f"expected the unwrapped FLUX.1 ControlNet, got {type(model).__name__}")
    save_state(model.state_dict(), path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)
    logger.info(
        "saved FLUX.1 ControlNet (%d double blocks) to %s (%s)", model.params.depth, path, dtype or "its dtypes"
    )
