"""Tiny random SD3/SD3.5 MMDiTs in the real layout, for tests, the quick start and benchmarks."""

from __future__ import annotations

import torch

from library.models.sd3.model import MMDiT, SD3Params
from library.models.sd3.pos_embed import sincos_2d_pos_embed

TINY_VARIANTS = ("medium", "5-medium", "5-large")


def tiny_sd3_params(
    variant: str = "medium",
    *,
    depth: int = 2,
    context_in_dim: int = 384,
    adm_in_dim: int = 320,
    pos_embed_max_size: int | None = None,
) -> SD3Params:
    """Real head dim (64), hidden 64 * depth; the variant's traits: "5-medium" has qk-norm, attn2 in block 0 and
    a table twice as large (64 patches vs 32, as 384 vs 192); "5-large" has qk-norm and no attn2."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown SD3 variant {variant!r}; expected one of {', '.join(TINY_VARIANTS)}")
    return SD3Params(
        depth=depth,
        context_in_dim=context_in_dim,
        adm_in_dim=adm_in_dim,
        pos_embed_max_size=pos_embed_max_size or (64 if variant == "5-medium" else 32),
        qk_norm=variant != "medium",
        x_block_self_attn_layers=(0,) if variant == "5-medium" else (),
    )


@torch.no_grad()
def make_sd3_state_dict(
    params: SD3Params, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights with every tensor distinct from its default, so a swapped or skipped tensor changes the
    output: norm weights 1 + noise, biases small noise, matrices scaled by 1/sqrt(fan_in) to keep activations
    finite; ``pos_embed`` is the sin-cos table plus noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = MMDiT(params)
    state = {}
    for key, meta in model.state_dict().items():
        noise = torch.randn(meta.shape, generator=generator)
        if key == "pos_embed":
            table = sincos_2d_pos_embed(params.hidden_size, params.pos_embed_max_size)
            tensor = table + 0.1 * noise
        elif key.endswith((".ln_q.weight", ".ln_k.weight")):
            tensor = 1.0 + 0.2 * noise
        elif meta.ndim >= 2:
            tensor = noise / meta[0].numel() ** 0.5
        else:
            tensor = 0.05 * noise
        state[key] = tensor.to(dtype)
    return state
