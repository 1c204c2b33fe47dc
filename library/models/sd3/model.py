"""The SD3/SD3.5 MMDiT (SD3 Medium, SD3.5 Medium, SD3.5 Large and Large Turbo), in Stability AI's layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.models.sd3.layers import HEAD_DIM, FinalLayer, JointBlock, PatchEmbed, TimestepEmbedder, VectorEmbedder
from library.models.sd3.pos_embed import VAE_STRIDE, crop_table

VARIANT_NAMES = {"medium": "SD3 Medium", "5-medium": "SD3.5 Medium", "5-large": "SD3.5 Large"}
# modelspec.implementation as upstream writes it: SAI's for SD3 checkpoints, "diffusers" for SD3 LoRAs
MODELSPEC_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
MODELSPEC_LORA_IMPLEMENTATION = "diffusers"


def sd3_variant(qk_norm: bool, dual_attention: bool) -> str:
    """Upstream's model_type: "medium" without qk-norm, else "5-medium" with attn2 blocks, else "5-large"."""
    if not qk_norm:
        return "medium"
    return "5-medium" if dual_attention else "5-large"


@dataclass(frozen=True)
class SD3Params:
    """The architecture; hidden size is 64 * depth and there are ``depth`` heads of 64 channels."""

    depth: int = 24
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_in_dim: int = 4096
    adm_in_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False
    x_block_self_attn_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        layers = self.x_block_self_attn_layers
        if list(layers) != sorted(set(layers)) or any(not 0 <= i < self.depth for i in layers):
            raise ValueError(f"x_block_self_attn_layers {layers} must be ascending block indices below {self.depth}")

    @property
    def hidden_size(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth

    @property
    def variant(self) -> str:
        return sd3_variant(self.qk_norm, bool(self.x_block_self_attn_layers))

    @property
    def display_name(self) -> str:
        return VARIANT_NAMES[self.variant]

    @property
    def modelspec_architecture(self) -> str:
        return f"stable-diffusion-3-{self.variant}"

    @property
    def max_image_size(self) -> int:
        """Largest image side in pixels that the position table covers."""
        return self.pos_embed_max_size * self.patch_size * VAE_STRIDE


SD3_MEDIUM = SD3Params(depth=24, pos_embed_max_size=192)
SD3_5_MEDIUM = SD3Params(depth=24, pos_embed_max_size=384, qk_norm=True, x_block_self_attn_layers=tuple(range(13)))
SD3_5_LARGE = SD3Params(depth=38, pos_embed_max_size=192, qk_norm=True)
REAL_PARAMS = {"medium": SD3_MEDIUM, "5-medium": SD3_5_MEDIUM, "5-large": SD3_5_LARGE}


class MMDiT(nn.Module):
    """Rectified-flow transformer on 2x2 latent patches, with joint attention over text and image tokens."""

    def __init__(self, params: SD3Params):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        self.x_embedder = PatchEmbed(params.in_channels, hidden, params.patch_size)
        self.register_buffer("pos_embed", torch.zeros(1, params.pos_embed_max_size**2, hidden))
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = VectorEmbedder(params.adm_in_dim, hidden)
        self.context_embedder = nn.Linear(params.context_in_dim, hidden)
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden,
                params.num_heads,
                params.mlp_ratio,
                params.qk_norm,
                pre_only=i == params.depth - 1,
                dual_attention=i in params.x_block_self_attn_layers,
            )
            for i in range(params.depth)
        )
        self.final_layer = FinalLayer(hidden, params.patch_size, params.out_channels)

    def cropped_pos_embed(self, h_patches: int, w_patches: int, offset: tuple[int, int] | None = None) -> Tensor:
        """[1, h*w, hidden] from the stored table: centred (top = (P-h)//2, left = (P-w)//2), or at ``offset``
        (top, left), as upstream's ``--pos_emb_random_crop_rate`` draws it."""
        size = self.params.pos_embed_max_size
        if h_patches > size or w_patches > size:
            scale = self.params.patch_size * VAE_STRIDE
            raise ValueError(
                f"a {h_patches * scale}x{w_patches * scale} px image ({h_patches}x{w_patches} patches) exceeds the "
                f"{self.params.display_name} position table of {size}x{size} patches: at most "
                f"{self.params.max_image_size} px per side"
            )
        return crop_table(self.pos_embed, size, h_patches, w_patches, offset)

    def forward(
        self, x: Tensor, timesteps: Tensor, y: Tensor, context: Tensor, pos_embed: Tensor | None = None
    ) -> Tensor:
        """Predict the flow for latents ``x`` [B, 16, H, W] at ``timesteps`` [B] = sigma * 1000 (not divided),
        from pooled text ``y`` [B, adm] and text tokens ``context`` [B, L, ctx].

        ``pos_embed`` [1 or B, H/2 * W/2, hidden] replaces the centred crop of the stored table (a random crop,
        or a scaled table)."""
        p = self.params.patch_size
        batch, _, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of the patch size {p}")
        h, w = height // p, width // p
        if pos_embed is None:
            pos_embed = self.cropped_pos_embed(h, w)
        elif pos_embed.shape[-2:] != (h * w, self.params.hidden_size):
            raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not fit {h}x{w} patches")
        tokens = self.x_embedder(x)
        tokens = tokens + pos_embed.to(device=tokens.device, dtype=tokens.dtype)
        c = self.t_embedder(timesteps, tokens.dtype) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        for block in self.joint_blocks:
            ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)
        out = out.view(batch, h, w, p, p, self.params.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, self.params.out_channels, height, width)
