"""LoRA for FLUX.1 and its text encoders: ``--network_module networks.lora_flux``.

Only targets and their options live here; building is networks/lora_targets.py, modules, saving, loading and
merging are networks/lora.py. Names are upstream's (kohya-ss/sd-scripts networks/lora_flux.py), which ComfyUI
and diffusers read: ``lora_unet_`` + the BFL module path with dots as underscores, ``lora_te1_`` + CLIP-L's
``text_model.encoder.layers...`` path and ``lora_te3_`` + T5-XXL's ``encoder.block...`` path.

network_args: ``img_attn_dim``, ``txt_attn_dim``, ``img_mlp_dim``, ``txt_mlp_dim``, ``img_mod_dim``,
``txt_mod_dim``, ``single_dim``, ``single_mod_dim`` (0 skips), ``in_dims`` (img_in, time_in, vector_in,
guidance_in, txt_in), ``train_blocks`` (all/single/double), ``train_double_block_indices``,
``train_single_block_indices``, ``split_qkv``, ``train_t5xxl``, ``network_reg_dims``, ``network_reg_lrs``,
``ggpo_beta``/``ggpo_sigma``, ``rank_dropout``, ``module_dropout``, ``loraplus_*lr_ratio``, ``verbose``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from networks.lora import LoRAModule, LoRANetwork
from networks.lora_targets import (
    BlockGroup,
    LoRAArchitecture,
    TextEncoderSlot,
    build_network,
    build_network_from_weights,
)

__all__ = ["FLUX_LORA", "LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights"]

LORA_PREFIX_FLUX = "lora_unet"
LORA_PREFIX_TEXT_ENCODER_CLIP = "lora_te1"
LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"


def split_dims_for(path: str, layer: nn.Module) -> tuple[int, ...] | None:
    """q/k/v (and the MLP input of single blocks) as separate parts, for split_qkv."""
    if path.startswith("double_blocks.") and path.endswith(".qkv"):
        return (layer.out_features // 3,) * 3
    if path.startswith("single_blocks.") and path.endswith(".linear1"):
        hidden = layer.in_features
        return (hidden, hidden, hidden, layer.out_features - 3 * hidden)
    return None


FLUX_LORA = LoRAArchitecture(
    title="FLUX.1",
    module="networks.lora_flux",
    block_groups=(
        BlockGroup("double", "double_blocks", "train_double_block_indices"),
        BlockGroup("single", "single_blocks", "train_single_block_indices"),
    ),
    # rank per layer kind, and the name fragments that pick the layers (first match wins, as upstream)
    type_dims={
        "img_attn_dim": ("img_attn",),
        "txt_attn_dim": ("txt_attn",),
        "img_mlp_dim": ("img_mlp",),
        "txt_mlp_dim": ("txt_mlp",),
        "img_mod_dim": ("img_mod",),
        "txt_mod_dim": ("txt_mod",),
        "single_dim": ("single_blocks", "linear"),
        "single_mod_dim": ("modulation",),
    },
    extra_dims_arg="in_dims",
    extra_layers=("img_in", "time_in", "vector_in", "guidance_in", "txt_in"),
    text_encoders=(
        TextEncoderSlot(LORA_PREFIX_TEXT_ENCODER_CLIP, "clip"),
        TextEncoderSlot(LORA_PREFIX_TEXT_ENCODER_T5, "t5"),
    ),
    split_dims=split_dims_for,
    train_blocks_arg=True,
)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    ae: Any,
    text_encoders: Any,
    flux: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Upstream's entry point: a new LoRA for ``flux`` (and CLIP-L, plus T5-XXL with train_t5xxl=True);
    ``text_encoders`` is [clip_l, t5xxl] (either may be None)."""
    return build_network(FLUX_LORA, multiplier, network_dim, network_alpha, text_encoders, flux, neuron_dropout, kwargs)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    ae: Any,
    text_encoders: Any,
    flux: nn.Module,
    weights_sd: dict | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict]:
    """Upstream's entry point: a network shaped like a saved LoRA (rank and alpha per module from the file;
    T5-XXL when it has ``lora_te3_`` keys). Weights are not loaded, so the caller may load or merge them."""
    return build_network_from_weights(FLUX_LORA, multiplier, file, text_encoders, flux, weights_sd, for_inference,
                                      kwargs)  # fmt: skip
