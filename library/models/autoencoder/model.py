"""The LDM-layout KL autoencoder: FLUX.1's ``ae.safetensors`` and the SD3/SD3.5 VAE (16 latent channels, the
same architecture with a different latent scaling), and with ``use_quant_conv`` the SD1.x/SDXL layout.

Parameter names are those of the files (``encoder.down.0.block.0.conv1.weight``, ``decoder.up.3.upsample.conv``,
``encoder.mid.attn_1.q``), so a state dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FLUX1_SCALE_FACTOR = 0.3611
FLUX1_SHIFT_FACTOR = 0.1159
SD3_SCALE_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609

NORM_GROUPS = 32
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float
    use_quant_conv: bool = False

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(
                f"needs a level and a res block (ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks})"
            )
        odd = [c for c in (self.ch, *self.channels) if c % NORM_GROUPS]
        if odd:
            raise ValueError(f"channel counts {odd} are not multiples of the {NORM_GROUPS} GroupNorm groups")

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of each resolution level, highest resolution first."""
        return tuple(self.ch * m for m in self.ch_mult)


def flux1_autoencoder_params() -> AutoEncoderParams:
    """The configuration of BFL's FLUX.1 ``ae.safetensors`` (SD3's VAE differs only in the scaling)."""
    return AutoEncoderParams(
        resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
        scale_factor=FLUX1_SCALE_FACTOR, shift_factor=FLUX1_SHIFT_FACTOR,
    )  # fmt: skip


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        normed = self.norm(x)
        q, k, v = (rearrange(proj(normed), "b c h w -> b 1 (h w) c") for proj in (self.q, self.k, self.v))
        attended = rearrange(F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=height, w=width)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (as the checkpoints were trained)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(channels[:-1], channels[1:]))
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(i, o) for i, o in zip(channels[:-1], channels[1:]))
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> moments [B, 2 * z_channels, H / f, W / f] (mean and log-variance)."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        channels = params.channels
        self.conv_in = nn.Conv2d(params.in_channels, params.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(c_in, c_out, params.num_res_blocks, downsample=level < len(channels) - 1)
            for level, (c_in, c_out) in enumerate(zip((params.ch, *channels[:-1]), channels))
        )
        self.mid = MidBlock(channels[-1])
        self.norm_out = _group_norm(channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], 2 * params.z_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h * f, w * f]. ``up[0]`` is the highest resolution level
    and runs last, as in the checkpoints."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        channels = params.channels
        self.conv_in = nn.Conv2d(params.z_channels, channels[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(channels[-1])
        inputs = (*channels[1:], channels[-1])
        self.up = nn.ModuleList(
            UpLevel(c_in, c_out, params.num_res_blocks + 1, upsample=level > 0)
            for level, (c_in, c_out) in enumerate(zip(inputs, channels))
        )
        self.norm_out = _group_norm(channels[0])
        self.conv_out = nn.Conv2d(channels[0], params.out_ch, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """KL autoencoder whose ``encode``/``decode`` speak scaled latents: ``scale_factor * (z - shift_factor)``."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        z = params.z_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, kernel_size=1) if params.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, kernel_size=1) if params.use_quant_conv else None

    @property
    def latent_channels(self) -> int:
        return self.params.z_channels

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side: 8 for the real models."""
        return 2 ** (len(self.params.ch_mult) - 1)

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled mean and (clamped) log-variance of the diagonal Gaussian posterior for images in [-1, 1]."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> scaled latents; the posterior mean, or a sample drawn with ``generator``."""
        mean, logvar = self.encode_moments(x)
        z = mean
        if sample:
            noise_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.params.scale_factor * (z - self.params.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in about [-1, 1]."""
        z = z / self.params.scale_factor + self.params.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
