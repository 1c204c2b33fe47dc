"""OFT for FLUX.1: ``--network_module networks.oft_flux`` (upstream's networks/oft_flux.py, its file format).

Only targets live here; the module, the network and building them are networks/oft.py. Names are upstream's:
``oft_unet_`` + the BFL module path with dots as underscores. By default the Linears of every attention module
(``qkv`` and ``proj`` of the double blocks' img/txt attention: 76 modules on FLUX.1); with
``enable_all_linear=True`` every Linear of the double and single blocks, modulations included (304). Outputs split
as upstream: double ``qkv`` into q/k/v, single ``linear1`` into q/k/v and the MLP input; ``--network_dim`` is the
number of blocks per split and must divide each, ``--network_alpha`` the norm constraint (default 1e-3).

network_args: ``enable_all_linear`` (True/False, parsed as a boolean: upstream enables it for "False"),
``network_reg_lrs``, ``verbose``. No text-encoder modules, as upstream.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from networks.lora_flux import split_dims_for
from networks.oft import OFTArchitecture, OFTModule, OFTNetwork, build_oft_network, build_oft_network_from_weights

__all__ = ["FLUX_OFT", "OFTModule", "OFTNetwork", "create_network", "create_network_from_weights"]

OFT_PREFIX_UNET = "oft_unet"

FLUX_OFT = OFTArchitecture(
    title="FLUX.1",
    module="networks.oft_flux",
    attention_classes=("SelfAttention",),
    block_classes=("DoubleStreamBlock", "SingleStreamBlock"),
    split_dims=split_dims_for,
    prefix=OFT_PREFIX_UNET,
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
) -> OFTNetwork:
    """Upstream's entry point: a new OFT for ``flux`` (the text encoders are not adapted)."""
    return build_oft_network(FLUX_OFT, multiplier, network_dim, network_alpha, flux, neuron_dropout, kwargs)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    ae: Any,
    text_encoders: Any,
    flux: nn.Module,
    weights_sd: dict | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[OFTNetwork, dict]:
    """Upstream's entry point: a network shaped like a saved OFT (modules, blocks and alpha from the file's keys).
    Weights are not loaded, so the caller may load or merge them."""
    return build_oft_network_from_weights(FLUX_OFT, multiplier, file, flux, weights_sd, for_inference, kwargs)
