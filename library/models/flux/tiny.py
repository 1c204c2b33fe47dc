"""Tiny random FLUX.1 transformers and ControlNets in the real layouts, for tests, the quick start and benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from library.models.flux.controlnet import ControlNetParams, FluxControlNet
from library.models.flux.model import Flux, FluxParams


def tiny_flux_params(
    *,
    hidden_size: int = 256,
    depth: int = 2,
    depth_single_blocks: int = 2,
    vec_in_dim: int = 128,
    context_in_dim: int = 128,
    guidance_embed: bool = True,
    in_channels: int = 64,
) -> FluxParams:
    """Real head dim (128) and rotary axes, so detection works as on real files; everything else small."""
    return FluxParams(
        in_channels=in_channels,
        out_channels=64,
        vec_in_dim=vec_in_dim,
        context_in_dim=context_in_dim,
        hidden_size=hidden_size,
        num_heads=hidden_size // 128,
        depth=depth,
        depth_single_blocks=depth_single_blocks,
        guidance_embed=guidance_embed,
    )


@torch.no_grad()
def make_flux_state_dict(
    params: FluxParams, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights with every tensor distinct from its default (norm scales too), so a swapped or skipped
    tensor changes the output; scaled by 1/sqrt(fan_in) to keep activations finite through the blocks."""
    with torch.device("meta"):
        model = Flux(params)
    return _random_state(model, seed, dtype)


@torch.no_grad()
def make_flux_controlnet_state_dict(
    params: ControlNetParams, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A random XLabs-layout ControlNet as :func:`make_flux_state_dict` makes a FLUX.1: the zero-initialised
    ``controlnet_blocks`` and last hint conv are random too, so the ControlNet changes the base model's output."""
    with torch.device("meta"):
        model = FluxControlNet(params)
    return _random_state(model, seed, dtype)


def _random_state(model: nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=generator)
        if key.endswith(".scale"):
            tensor = 1.0 + 0.2 * noise
        elif meta.ndim >= 2:
            tensor = noise / meta.shape[1:].numel() ** 0.5
        else:
            tensor = 0.05 * noise
        state[key] = tensor.to(dtype)
    return state
