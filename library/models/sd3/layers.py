"""Building blocks of the SD3 MMDiT, with Stability AI's module names (they are the checkpoint keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from library.models.flux.layers import timestep_embedding

HEAD_DIM = 64
TIMESTEP_FREQUENCIES = 256


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention over [B, H, L, D] tensors -> [B, L, H*D]."""
    return rearrange(F.scaled_dot_product_attention(q, k, v), "B H L D -> B L (H D)")


def _layer_norm(hidden_size: int) -> nn.LayerNorm:
    return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)


class RMSNorm(nn.Module):
    """RMS norm over the head dim with a learned scale (the qk-norm of SD3.5), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight.to(x.dtype)


class PatchEmbed(nn.Module):
    """Latents [B, C, H, W] -> patch tokens [B, H/p * W/p, hidden], rows outermost."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _embedding_mlp(in_dim: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))


class VectorEmbedder(nn.Module):
    """Two-layer MLP with SiLU: the pooled-text embedder ``y_embedder``."""

    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = _embedding_mlp(in_dim, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding (256 frequencies, cos half first) of t = sigma * 1000, then a two-layer MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = _embedding_mlp(TIMESTEP_FREQUENCIES, hidden_size)

    def forward(self, timesteps: Tensor, dtype: torch.dtype) -> Tensor:
        return self.mlp(timestep_embedding(timesteps, TIMESTEP_FREQUENCIES, time_factor=1.0).to(dtype))


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden_dim, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionLinears(nn.Module):
    """The q/k/v and output projections of one attention, with optional RMS qk-norm; heads of 64 channels."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.proj = None if pre_only else nn.Linear(hidden_size, hidden_size)
        self.ln_q = RMSNorm(hidden_size // num_heads) if qk_norm else nn.Identity()
        self.ln_k = RMSNorm(hidden_size // num_heads) if qk_norm else nn.Identity()

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v as [B, H, L, 64]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        return self.ln_q(q), self.ln_k(k), v


class DiTBlock(nn.Module):
    """One stream (context or image) of a joint block: adaLN-modulated attention projections and MLP.

    ``pre_only`` (the last context block) only makes q, k, v, with a 2-way modulation (shift, scale).
    ``dual_attention`` (SD3.5 Medium image blocks) adds ``attn2``, a self-attention over the image tokens
    alone, and a 9-way modulation: shift/scale/gate for attn, for the MLP, then for attn2.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool = False,
        dual_attention: bool = False,
    ):
        super().__init__()
        if pre_only and dual_attention:
            raise ValueError("a pre-only block cannot have a second attention")
        self.pre_only = pre_only
        self.norm1 = _layer_norm(hidden_size)
        self.attn = AttentionLinears(hidden_size, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = AttentionLinears(hidden_size, num_heads, qk_norm) if dual_attention else None
        self.norm2 = None if pre_only else _layer_norm(hidden_size)
        self.mlp = None if pre_only else Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.num_modulations = 9 if dual_attention else 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, self.num_modulations * hidden_size))

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """The adaLN chunks, each [B, 1, hidden]."""
        return self.adaLN_modulation(c)[:, None, :].chunk(self.num_modulations, dim=-1)

    def mlp_residual(self, x: Tensor, shift: Tensor, scale: Tensor, gate: Tensor) -> Tensor:
        return x + gate * self.mlp(modulate(self.norm2(x), shift, scale))


class JointBlock(nn.Module):
    """Joint attention over context and image tokens, each stream with its own weights."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool, dual_attention: bool
    ):
        super().__init__()
        self.context_block = DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, dual_attention=dual_attention)

    def forward(self, context: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor]:
        """Context [B, Lc, h], image tokens [B, Lx, h], conditioning vector [B, h] -> (context or None, x)."""
        ctx_mod = self.context_block.modulations(c)
        x_mod = self.x_block.modulations(c)
        ctx_q, ctx_k, ctx_v = self.context_block.attn.heads(
            modulate(self.context_block.norm1(context), ctx_mod[0], ctx_mod[1])
        )
        x_normed = self.x_block.norm1(x)
        x_q, x_k, x_v = self.x_block.attn.heads(modulate(x_normed, x_mod[0], x_mod[1]))
        joint = attention(torch.cat((ctx_q, x_q), 2), torch.cat((ctx_k, x_k), 2), torch.cat((ctx_v, x_v), 2))
        ctx_attn, x_attn = joint.split([context.shape[1], x.shape[1]], dim=1)

        x = x + x_mod[2] * self.x_block.attn.proj(x_attn)
        if self.x_block.attn2 is not None:
            attn2 = attention(*self.x_block.attn2.heads(modulate(x_normed, x_mod[6], x_mod[7])))
            x = x + x_mod[8] * self.x_block.attn2.proj(attn2)
        x = self.x_block.mlp_residual(x, *x_mod[3:6])
        if self.context_block.pre_only:
            return None, x
        context = context + ctx_mod[2] * self.context_block.attn.proj(ctx_attn)
        return self.context_block.mlp_residual(context, *ctx_mod[3:6]), x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))
