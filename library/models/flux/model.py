"""The FLUX.1 transformer (dev and schnell), in Black Forest Labs' layout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from library.models.flux.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)

# modelspec.implementation of FLUX.1 files and LoRAs, as upstream writes it
MODELSPEC_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.hidden_size // self.num_heads:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.hidden_size // self.num_heads}")

    @property
    def variant(self) -> str:
        return "dev" if self.guidance_embed else "schnell"


class Flux(nn.Module):
    """Flow-matching transformer on packed 2x2 latent patches, conditioned on T5 tokens and a CLIP vector."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(params.hidden_size // params.num_heads, params.theta, list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
        controlnet_block_samples: Sequence[Tensor] | None = None,
        controlnet_scale: float = 1.0,
    ) -> Tensor:
        """Predict the flow velocity for packed latents ``img`` [B, L, C] at ``timesteps`` in [0, 1].

        ``txt_attention_mask`` [B, L_txt] (1 = real token) masks padded T5 tokens out of every attention.
        ``controlnet_block_samples`` (a ControlNet's output): double block i adds ``controlnet_scale`` times sample
        ``i % len(samples)`` to its image output, reused cyclically as XLabs, ComfyUI and diffusers do.
        """
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("FLUX.1 dev needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = _joint_attention_mask(txt_attention_mask, img.shape[1])
        for i, block in enumerate(self.double_blocks):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask)
            if controlnet_block_samples:
                img = img + controlnet_scale * controlnet_block_samples[i % len(controlnet_block_samples)]
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe, attn_mask=attn_mask)
        return self.final_layer(x[:, txt.shape[1] :, ...], vec)


def _joint_attention_mask(txt_attention_mask: Tensor | None, img_len: int) -> Tensor | None:
    if txt_attention_mask is None:
        return None
    img_mask = torch.ones(txt_attention_mask.shape[0], img_len, dtype=torch.bool, device=txt_attention_mask.device)
    return torch.cat((txt_attention_mask.bool(), img_mask), dim=1)[:, None, None, :]
