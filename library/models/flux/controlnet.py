"""The FLUX.1 ControlNet in XLabs' layout (upstream's ``ControlNetFlux``): FLUX's input embedders and its first
double blocks, fed an RGB hint, returning one residual per double block for the base model to add.

Module names are the checkpoint keys of XLabs' releases and of upstream's ``flux_train_control_net.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.models.flux.layers import DoubleStreamBlock, EmbedND, MLPEmbedder, timestep_embedding
from library.models.flux.model import Flux, FluxParams, _joint_attention_mask
from library.models.flux.sampling import pack_latents

HINT_CHANNELS = 16  # channels of the hint map, packed 2x2 into 64 like the latents
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2, 1)  # the 8 convs of input_hint_block; three stride 2: pixels -> latent grid
PIXELS_PER_TOKEN = 16  # hint pixels per packed latent token along each side (8x VAE, 2x2 packing)
HEAD_MODULES = ("controlnet_blocks", "pos_embed_input", "input_hint_block")  # what the base model lacks


@dataclass(frozen=True)
class ControlNetParams:
    """``base``: the FLUX.1 model the ControlNet steers (widths, text dims, rotary axes, guidance embedding); its
    block counts are not the ControlNet's. ``depth``: double blocks; ``depth_single``: single blocks (only 0)."""

    base: FluxParams
    depth: int = 2
    depth_single: int = 0

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"ControlNet depth {self.depth}: needs at least one double block")
        if self.depth_single:
            raise ValueError(
                f"ControlNet depth_single {self.depth_single}: single blocks are not supported (upstream adds the "
                "double blocks' samples through them, which cannot match the joint text+image sequence)"
            )

    def mismatches(self, base: FluxParams) -> list[str]:
        """How ``base`` differs from the model this ControlNet was made for, where it matters (empty: it fits)."""
        names = ("in_channels", "hidden_size", "num_heads", "vec_in_dim", "context_in_dim", "axes_dim", "theta")
        mine = self.base
        return [f"{n} {getattr(mine, n)} vs {getattr(base, n)}" for n in names if getattr(mine, n) != getattr(base, n)]


def _zero(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def _hint_block() -> nn.Sequential:
    """8 convs 3 -> 16 -> ... -> 16 with SiLU between (indices 0, 2, ..., 14), the last zero-initialised."""
    layers: list[nn.Module] = []
    for i, stride in enumerate(HINT_STRIDES):
        if i:
            layers.append(nn.SiLU())
        layers.append(nn.Conv2d(3 if i == 0 else HINT_CHANNELS, HINT_CHANNELS, 3, padding=1, stride=stride))
    _zero(layers[-1])
    return nn.Sequential(*layers)


def _check_hint(hint: Tensor, img: Tensor) -> None:
    batch, tokens = img.shape[:2]
    size = PIXELS_PER_TOKEN
    if (
        hint.ndim != 4 or hint.shape[0] != batch or hint.shape[1] != 3 or hint.shape[2] % size
        or hint.shape[3] % size or (hint.shape[2] // size) * (hint.shape[3] // size) != tokens
    ):  # fmt: skip
        raise ValueError(
            f"ControlNet hint of shape {tuple(hint.shape)} does not match the latents ({batch} x {tokens} tokens): "
            f"expected [{batch}, 3, H, W] at the image's pixel size, H and W multiples of {size}, "
            f"(H/{size}) * (W/{size}) = {tokens}"
        )


class FluxControlNet(nn.Module):
    """XLabs-style ControlNet: ``img_in(x) + pos_embed_input(hint)`` through ``depth`` double blocks; each block's
    image output through a zero-initialised ``controlnet_blocks[i]`` is one sample for :class:`Flux`."""

    def __init__(self, params: ControlNetParams):
        super().__init__()
        self.params = params
        base = params.base
        hidden = base.hidden_size
        self.pe_embedder = EmbedND(hidden // base.num_heads, base.theta, list(base.axes_dim))
        self.img_in = nn.Linear(base.in_channels, hidden, bias=True)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(base.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if base.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(base.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, base.num_heads, base.mlp_ratio, base.qkv_bias) for _ in range(params.depth)
        )
        self.controlnet_blocks = nn.ModuleList(_zero(nn.Linear(hidden, hidden)) for _ in range(params.depth))
        self.pos_embed_input = nn.Linear(4 * HINT_CHANNELS, hidden, bias=True)
        self.input_hint_block = _hint_block()

    def unused_parameters(self) -> list[nn.Parameter]:
        """The last double block's text-stream output layers: only each block's image output becomes a sample, so
        the last block's text output is never used and these weights never get a gradient. Training freezes them
        (they would not change anyway); DDP needs every trained parameter to get one."""
        last = self.double_blocks[-1]
        return [*last.txt_attn.proj.parameters(), *last.txt_mlp.parameters()]

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        controlnet_cond: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        txt_attention_mask: Tensor | None = None,
    ) -> list[Tensor]:
        """One sample [B, L, hidden] per double block, for :class:`Flux`'s ``controlnet_block_samples``.

        ``controlnet_cond``: the hint [B, 3, H, W], RGB in [-1, 1] at the image's pixel size (the latents' x8);
        the other inputs are those of :class:`Flux`."""
        _check_hint(controlnet_cond, img)
        hint = pack_latents(self.input_hint_block(controlnet_cond))
        img = self.img_in(img) + self.pos_embed_input(hint)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.base.guidance_embed:
            if guidance is None:
                raise ValueError("a FLUX.1 dev ControlNet needs a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = _joint_attention_mask(txt_attention_mask, img.shape[1])
        samples = []
        for block, controlnet_block in zip(self.double_blocks, self.controlnet_blocks, strict=True):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask)
            samples.append(controlnet_block(img))
        return samples


def new_flux_controlnet(base: Flux, depth: int = 2, init_from_base: bool = False) -> FluxControlNet:
    """A fresh ControlNet for ``base``, on its device and in its dtype (those of ``base.img_in``): default init with
    zero ``controlnet_blocks`` and last hint conv, so ``base`` first predicts as without it. ``init_from_base``
    copies ``base``'s embedders and first ``depth`` double blocks, as XLabs does (fp8 weights are upcast)."""
    reference = base.img_in.weight
    params = ControlNetParams(base.params, depth)
    with torch.device(reference.device):
        model = FluxControlNet(params).to(reference.dtype)
    if init_from_base:
        if depth > base.params.depth:
            raise ValueError(f"cannot copy {depth} double blocks from a FLUX.1 with {base.params.depth}")
        base_state = base.state_dict()
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                if not key.startswith(HEAD_MODULES):
                    tensor.copy_(base_state[key])
    return model
