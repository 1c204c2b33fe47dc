"""LoRA for the SD3/SD3.5 MMDiT and its text encoders: ``--network_module networks.lora_sd3``.

Only targets and their options live here; building is networks/lora_targets.py, modules, saving, loading and
merging are networks/lora.py. Names are upstream's (kohya-ss/sd-scripts networks/lora_sd3.py) and ComfyUI's:
``lora_unet_`` + the module path in Stability AI's checkpoint (``model.diffusion_model.<path>.weight``) with dots
as underscores, e.g. ``lora_unet_joint_blocks_0_context_block_attn_qkv``; ``lora_te1_``/``lora_te2_`` + CLIP-L's
and CLIP-G's ``text_model.encoder.layers...`` paths; ``lora_te3_`` + T5-XXL's ``encoder.block...`` paths.

Default targets: every Linear in the joint blocks (237 modules for SD3 Medium, 263 for SD3.5 Medium, 377 for
SD3.5 Large), CLIP-L and CLIP-G, and T5-XXL with ``train_t5xxl=True``. network_args: ``context_attn_dim``,
``context_mlp_dim``, ``context_mod_dim``, ``x_attn_dim`` (attn2 too), ``x_mlp_dim``, ``x_mod_dim`` (0 skips),
``emb_dims`` (context_embedder, t_embedder, x_embedder, y_embedder, final_layer adaLN, final_layer linear; the
x_embedder conv takes ``conv_dim``/``conv_alpha`` when given), ``train_block_indices`` (all/none/0,2,4-7),
``split_qkv``, ``train_t5xxl``, ``rank_dropout``, ``module_dropout``, ``loraplus_*lr_ratio``, ``verbose``; and,
beyond upstream's SD3 LoRA, the shared ``network_reg_dims``, ``network_reg_lrs`` and ``ggpo_beta``/``ggpo_sigma``.
``--text_encoder_lr`` takes 1-3 values (CLIP-L, CLIP-G, T5); with 2 the second is T5's too.
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

__all__ = ["SD3_LORA", "LoRAModule", "LoRANetwork", "create_network", "create_network_from_weights"]

LORA_PREFIX_SD3 = "lora_unet"
LORA_PREFIX_TEXT_ENCODER_CLIP_L = "lora_te1"
LORA_PREFIX_TEXT_ENCODER_CLIP_G = "lora_te2"
LORA_PREFIX_TEXT_ENCODER_T5 = "lora_te3"


def split_dims_for(path: str, layer: nn.Module) -> tuple[int, ...] | None:
    """q, k and v of every joint-block attention (attn and attn2) as separate parts, for split_qkv."""
    if path.startswith("joint_blocks.") and path.endswith(".qkv"):
        return (layer.out_features // 3,) * 3
    return None


SD3_LORA = LoRAArchitecture(
    title="SD3",
    module="networks.lora_sd3",
    block_groups=(BlockGroup("joint", "joint_blocks", "train_block_indices"),),
    # rank per layer kind, and the name fragments that pick the layers (first match wins, as upstream)
    type_dims={
        "context_attn_dim": ("context_block", "attn"),
        "context_mlp_dim": ("context_block", "mlp"),
        "context_mod_dim": ("context_block", "adaLN_modulation"),
        "x_attn_dim": ("x_block", "attn"),
        "x_mlp_dim": ("x_block", "mlp"),
        "x_mod_dim": ("x_block", "adaLN_modulation"),
    },
    extra_dims_arg="emb_dims",
    extra_layers=(
        "context_embedder",
        "t_embedder",
        "x_embedder",
        "y_embedder",
        "final_layer.adaLN_modulation",
        "final_layer.linear",
    ),  # fmt: skip
    text_encoders=(
        TextEncoderSlot(LORA_PREFIX_TEXT_ENCODER_CLIP_L, "clip"),
        TextEncoderSlot(LORA_PREFIX_TEXT_ENCODER_CLIP_G, "clip"),
        TextEncoderSlot(LORA_PREFIX_TEXT_ENCODER_T5, "t5"),
    ),
    split_dims=split_dims_for,
    conv_args=True,
)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    mmdit: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Upstream's entry point: a new LoRA for ``mmdit`` and ``text_encoders`` = [clip_l, clip_g, t5xxl] (any
    may be None; T5 only with train_t5xxl=True)."""
    return build_network(SD3_LORA, multiplier, network_dim, network_alpha, text_encoders, mmdit, neuron_dropout, kwargs)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoders: Any,
    mmdit: nn.Module,
    weights_sd: dict | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict]:
    """Upstream's entry point: a network shaped like a saved LoRA (rank and alpha per module from the file;
    T5-XXL when it has ``lora_te3_`` keys). Weights are not loaded, so the caller may load or merge them."""
    return build_network_from_weights(SD3_LORA, multiplier, file, text_encoders, mmdit, weights_sd, for_inference,
                                      kwargs)  # fmt: skip
