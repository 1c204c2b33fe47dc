"""The models of a run as the memory estimate sees them: their architecture read off the checkpoints' headers
(nothing is loaded), rebuilt on the ``meta`` device with the dtype each loader gives each tensor, and what is
family-specific about the denoiser: its block lists, its inputs for a batch, and which blocks swap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, read_header
from library.memory.block_swap import split_flux_swap
from library.memory.estimate_activations import BlockList
from library.memory.fp8 import FP8_DTYPES
from library.models.autoencoder.loading import AUTOENCODER_PREFIXES, detect_autoencoder_params
from library.models.autoencoder.model import (
    FLUX1_SCALE_FACTOR,
    FLUX1_SHIFT_FACTOR,
    SD3_SCALE_FACTOR,
    SD3_SHIFT_FACTOR,
    AutoEncoder,
    AutoEncoderParams,
)
from library.models.flux.loading import open_flux_checkpoint
from library.models.flux.model import Flux, FluxParams
from library.models.flux.sampling import prepare_img_ids, unpack_latents
from library.models.flux.text_conditioning import default_t5_max_length
from library.models.sd3.components import resolve_sd3_files
from library.models.sd3.loading import SD3_VAE_PREFIXES
from library.models.sd3.model import MMDiT, SD3Params
from library.models.sd3.text_conditioning import CLIP_MAX_LENGTH, DEFAULT_T5_MAX_LENGTH
from library.models.text_encoders.clip import PROJECTION, clip_config_from_header
from library.models.text_encoders.t5 import t5_config_from_header

FP8 = torch.float8_e4m3fn
FAMILIES = ("flux", "sd3")


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder as its loader builds it: CLIP (``projection``: built with a projection; an identity one
    when the file has none) or T5."""

    name: str
    config: CLIPTextConfig | T5Config
    projection: bool = False

    def build(self) -> nn.Module:
        if isinstance(self.config, T5Config):
            return T5EncoderModel(self.config)
        return CLIPTextModelWithProjection(self.config) if self.projection else CLIPTextModel(self.config)


@dataclass(frozen=True)
class Architecture:
    """A run's models as read off their headers: the family, the denoiser's params, the text encoders (in the
    order the family and its LoRA name them) and the autoencoder."""

    family: str
    denoiser: FluxParams | SD3Params
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    autoencoder: AutoEncoderParams | None = None
    name: str = ""
    measured: dict = field(default_factory=dict, compare=False, repr=False)  # encoder peaks by their inputs

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def layout(self) -> DenoiserLayout:
        return FluxLayout(self.denoiser) if self.family == "flux" else SD3Layout(self.denoiser)


def _clip_layout(header: SafetensorsHeader, outer: str) -> str:
    for prefix in (f"{outer}text_model.", outer):
        if f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in header:
            return prefix
    raise UserError(f"{header.path}: no CLIP text encoder under {outer!r}")


def _clip_spec(name: str, path: str, prefix: str, option: str, projection: bool | None) -> TextEncoderSpec:
    """``projection`` None: as the file (FLUX's CLIP-L); True: always (SD3, identity when the file has none)."""
    header = read_header(path, option)
    config = clip_config_from_header(header, _clip_layout(header, prefix), prefix)
    has_projection = f"{prefix}{PROJECTION}" in header
    return TextEncoderSpec(name, config, has_projection if projection is None else projection)


def _t5_spec(path: str, prefix: str, option: str) -> TextEncoderSpec:
    return TextEncoderSpec("T5-XXL", t5_config_from_header(read_header(path, option), prefix))


def _autoencoder_params(path: str, option: str, prefixes: tuple[str, ...], scale: float, shift: float,
                        prefix: str | None = None) -> AutoEncoderParams:  # fmt: skip
    header = read_header(path, option)
    if prefix is None:
        prefix = next((p for p in prefixes if f"{p}encoder.conv_in.weight" in header), None)
        if prefix is None:
            raise UserError(f"{option} {path}: expected an autoencoder (AE/VAE), found no encoder.conv_in.weight")
    return detect_autoencoder_params(header, scale, shift, prefix=prefix, what=f"{option} {path}")


def read_architecture(
    family: str,
    checkpoint: str | Path,
    *,
    clip_l: str | None = None,
    clip_g: str | None = None,
    t5xxl: str | None = None,
    vae: str | None = None,
) -> Architecture:
    """Read every model's architecture from its file's header, as the family's loaders would find it (``vae`` is
    FLUX's ``--ae``, or SD3's ``--vae``; SD3 encoders and VAE default to the copies inside the checkpoint)."""
    if family == "flux":
        opened = open_flux_checkpoint(checkpoint)
        encoders = []
        if clip_l:
            encoders.append(_clip_spec("CLIP-L", clip_l, "", "--clip_l", None))
        if t5xxl:
            encoders.append(_t5_spec(t5xxl, "", "--t5xxl"))
        ae = (
            _autoencoder_params(vae, "--ae", AUTOENCODER_PREFIXES, FLUX1_SCALE_FACTOR, FLUX1_SHIFT_FACTOR)
            if vae
            else None
        )
        return Architecture("flux", opened.params, tuple(encoders), ae, f"FLUX.1 {opened.params.variant}")
    if family != "sd3":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    files = resolve_sd3_files(checkpoint, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, vae=vae)
    encoders = (
        _clip_spec("CLIP-L", files.clip_l.path, files.clip_l.prefix, files.clip_l.option, True),
        _clip_spec("CLIP-G", files.clip_g.path, files.clip_g.prefix, files.clip_g.option, True),
        _t5_spec(files.t5xxl.path, files.t5xxl.prefix, files.t5xxl.option),
    )
    prefix = files.vae.prefix or None
    ae = _autoencoder_params(files.vae.path, files.vae.option, SD3_VAE_PREFIXES, SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR,
                             prefix)  # fmt: skip
    params = files.checkpoint.params
    return Architecture("sd3", params, encoders, ae, params.display_name)


@dataclass(frozen=True)
class ComponentMemory:
    """One model's tensors as loaded: bytes per dtype (parameters and buffers, shared storages once)."""

    name: str
    by_dtype: dict[torch.dtype, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())


def tensor_bytes(tensors: list[Tensor]) -> dict[torch.dtype, int]:
    """Bytes per dtype of ``tensors`` (meta or real), each storage once."""
    seen: dict[int, tuple[torch.dtype, int]] = {}
    for t in tensors:
        seen[t.untyped_storage()._cdata] = (t.dtype, t.untyped_storage().nbytes())
    by_dtype: dict[torch.dtype, int] = {}
    for dtype, size in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    return by_dtype


def module_memory(name: str, module: nn.Module) -> ComponentMemory:
    return ComponentMemory(name, tensor_bytes([*module.parameters(), *module.buffers()]))


def build_text_encoder(spec: TextEncoderSpec, dtype: torch.dtype) -> nn.Module:
    """On meta with the loader's dtypes: floats in ``dtype``; T5's ``wo`` in fp32 for fp16 (its overflow guard)."""
    with torch.device("meta"):
        model = spec.build()
    model.to(dtype)
    if isinstance(spec.config, T5Config) and dtype == torch.float16:
        for name, module in model.named_modules():
            if name.endswith("DenseReluDense.wo"):
                module.to(torch.float32)
    return model.requires_grad_(False)


def build_autoencoder(params: AutoEncoderParams, dtype: torch.dtype) -> AutoEncoder:
    with torch.device("meta"):
        return AutoEncoder(params).to(dtype).requires_grad_(False)


def cast_block_linears_to_fp8(blocks: list[nn.Module]) -> None:
    """What ``fp8_linear`` loading does: the Linear weights inside the blocks stored as float8_e4m3fn."""
    for block in blocks:
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype not in FP8_DTYPES:
                module.weight = nn.Parameter(module.weight.data.to(FP8), requires_grad=False)


def swapped_weight_bytes(blocks: list[nn.Module]) -> int:
    """Bytes block swap moves for ``blocks``: every module's ``.weight`` (biases, norm scales, buffers and the
    network's parameters stay on the GPU, as upstream's ``weighs_to_device``)."""
    tensors = [m.weight for b in blocks for m in b.modules() if isinstance(getattr(m, "weight", None), Tensor)]
    return sum(tensor_bytes(tensors).values())


class DenoiserLayout:
    """What the estimate needs to know of one denoiser family (see ``FluxLayout``, ``SD3Layout``)."""

    lists: tuple[BlockList, ...]

    def build(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [b for entry in self.lists for b in getattr(model, entry.attribute)]

    def t5_tokens(self, t5_length: int | None) -> int:
        """T5 tokens for ``--t5xxl_max_token_length`` / ``--t5_max_length`` (None: the family's default)."""
        raise NotImplementedError

    def text_tokens(self, t5_length: int | None) -> int:
        """Text tokens the denoiser sees."""
        return self.t5_tokens(t5_length)

    def max_swap(self) -> int:
        """The most ``--blocks_to_swap`` upstream accepts for this model."""
        raise NotImplementedError

    def check_swap(self, blocks_to_swap: int, name: str) -> None:
        """UserError when ``blocks_to_swap`` is beyond this model's limit (the message block swap itself gives)."""
        if blocks_to_swap > self.max_swap():
            raise UserError(f"--blocks_to_swap {blocks_to_swap}: {name} swaps at most {self.max_swap()} blocks")

    def swapped_groups(self, model: nn.Module, blocks_to_swap: int) -> list[list[nn.Module]]:
        """The blocks whose weights leave the device, per offloader (one per block list with blocks to swap)."""
        raise NotImplementedError

    def swapped_blocks(self, model: nn.Module, blocks_to_swap: int) -> list[nn.Module]:
        return [b for group in self.swapped_groups(model, blocks_to_swap) for b in group]

    def forward(self, model: nn.Module, batch: int, width: int, height: int, text_length: int, dtype: torch.dtype,
                masked: bool, device: str = "meta") -> Callable[[], Tensor]:  # fmt: skip
        """A function that makes one batch's inputs and returns the denoiser's prediction for them, as the
        family's ``predict`` calls it; ``width``/``height`` in pixels."""
        raise NotImplementedError


def _check_size(width: int, height: int, multiple: int) -> None:
    if width % multiple or height % multiple:
        raise UserError(f"resolution {width}x{height}: each side must be a multiple of {multiple} pixels")


class FluxLayout(DenoiserLayout):
    """FLUX.1: double blocks then single blocks; ``--blocks_to_swap n`` swaps n//2 double and 2*(n - n//2) single
    blocks (a double block counts as two), each at most its count - 2, as upstream."""

    lists = (BlockList("double_blocks", ("img", "txt")), BlockList("single_blocks", ("x",)))

    def __init__(self, params: FluxParams):
        self.params = params

    def build(self) -> Flux:
        with torch.device("meta"):
            return Flux(self.params)

    def t5_tokens(self, t5_length: int | None) -> int:
        return t5_length or default_t5_max_length(not self.params.guidance_embed)

    @staticmethod
    def split(blocks_to_swap: int) -> tuple[int, int]:
        double = blocks_to_swap // 2
        return double, 2 * (blocks_to_swap - double)

    def check_swap(self, blocks_to_swap: int, name: str) -> None:
        split_flux_swap(blocks_to_swap, self.params.depth, self.params.depth_single_blocks)

    def max_swap(self) -> int:
        n = 0
        while self._fits(n + 1):
            n += 1
        return n

    def _fits(self, n: int) -> bool:
        double, single = self.split(n)
        return double <= self.params.depth - 2 and single <= self.params.depth_single_blocks - 2

    def swapped_groups(self, model: Flux, blocks_to_swap: int) -> list[list[nn.Module]]:
        double, single = self.split(blocks_to_swap)
        groups = [list(model.double_blocks[len(model.double_blocks) - double :]),
                  list(model.single_blocks[len(model.single_blocks) - single :])]  # fmt: skip
        return [g for g in groups if g]

    def forward(self, model: Flux, batch: int, width: int, height: int, text_length: int, dtype: torch.dtype,
                masked: bool, device: str = "meta") -> Callable[[], Tensor]:  # fmt: skip
        _check_size(width, height, 16)
        h, w, p = height // 8, width // 8, self.params

        def run() -> Tensor:
            def make(*shape: int) -> Tensor:
                return torch.randn(shape, dtype=dtype, device=device)

            tokens = (h // 2) * (w // 2)
            mask = torch.ones(batch, text_length, dtype=torch.long, device=device) if masked else None
            pred = model(
                img=make(batch, tokens, p.in_channels), img_ids=prepare_img_ids(batch, h, w, device).to(dtype),
                txt=make(batch, text_length, p.context_in_dim), txt_ids=make(batch, text_length, 3),
                timesteps=make(batch), y=make(batch, p.vec_in_dim),
                guidance=make(batch) if p.guidance_embed else None, txt_attention_mask=mask,
            )  # fmt: skip
            return unpack_latents(pred, h, w)

        return run


class SD3Layout(DenoiserLayout):
    """SD3/SD3.5: one list of joint blocks (the last is pre-only; SD3.5 Medium's first ones have a second
    attention); ``--blocks_to_swap n`` swaps the last n, at most depth - 2, as upstream."""

    lists = (BlockList("joint_blocks", ("context", "x")),)

    def __init__(self, params: SD3Params):
        self.params = params

    def build(self) -> MMDiT:
        with torch.device("meta"):
            return MMDiT(self.params)

    def t5_tokens(self, t5_length: int | None) -> int:
        return t5_length or DEFAULT_T5_MAX_LENGTH

    def text_tokens(self, t5_length: int | None) -> int:
        """77 CLIP tokens, then T5's."""
        return CLIP_MAX_LENGTH + self.t5_tokens(t5_length)

    def max_swap(self) -> int:
        return max(self.params.depth - 2, 0)

    def swapped_groups(self, model: MMDiT, blocks_to_swap: int) -> list[list[nn.Module]]:
        return [list(model.joint_blocks[len(model.joint_blocks) - blocks_to_swap :])] if blocks_to_swap else []

    def forward(self, model: MMDiT, batch: int, width: int, height: int, text_length: int, dtype: torch.dtype,
                masked: bool, device: str = "meta") -> Callable[[], Tensor]:  # fmt: skip
        _check_size(width, height, 8 * self.params.patch_size)
        p = self.params

        def run() -> Tensor:
            def make(*shape: int) -> Tensor:
                return torch.randn(shape, dtype=dtype, device=device)

            return model(make(batch, p.in_channels, height // 8, width // 8), make(batch), make(batch, p.adm_in_dim),
                         make(batch, text_length, p.context_in_dim))  # fmt: skip

        return run
