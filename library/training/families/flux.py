"""FLUX.1 as a model family for the shared training loop: what is model-specific about loading, encoding
prompts and images, running the denoiser, drawing sample images and naming the result."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from library.errors import UserError
from library.inference.flux_generate import (
    ControlNetInput,
    SampleSettings,
    control_hint,
    decode_images,
    open_control_image,
    sample_latents,
)
from library.memory.block_swap import BlockSwap, split_flux_swap, swap_blocks
from library.memory.estimate_models import Architecture, read_architecture
from library.memory.fp8 import enable_fp8_linear
from library.models.autoencoder.loading import load_autoencoder
from library.models.autoencoder.model import AutoEncoder
from library.models.flux.controlnet import FluxControlNet, new_flux_controlnet
from library.models.flux.controlnet_loading import (
    check_controlnet_fits,
    load_flux_controlnet,
    open_flux_controlnet,
    save_flux_controlnet,
)
from library.models.flux.loading import load_flux_model, open_flux_checkpoint
from library.models.flux.model import MODELSPEC_IMPLEMENTATION, Flux, FluxParams
from library.models.flux.sampling import pack_latents, prepare_img_ids, unpack_latents
from library.models.flux.text_conditioning import FluxTextConditioning, FluxTextEncoder, default_t5_max_length
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder
from library.models.text_encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from library.training.args import add_unsupported_args, objective_config
from library.training.families.latents import AutoEncoderLatentCodec
from library.training.family import LoadOptions, ModelInput
from library.training.objective import ObjectiveConfig
from library.training.sample_prompts import SamplePrompt

logger = logging.getLogger(__name__)

TEXT_KEYS = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")


@dataclass(frozen=True)
class FluxModelFiles:
    flux: str
    clip_l: str
    t5xxl: str
    ae: str
    clip_l_tokenizer: str | None = None
    t5xxl_tokenizer: str | None = None


@dataclass(frozen=True)
class FluxTextSettings:
    t5xxl_max_token_length: int | None = None  # None: 256 for schnell, 512 for dev
    apply_t5_attn_mask: bool = False


def flux_latent_codec(ae: AutoEncoder, sample: bool = True) -> AutoEncoderLatentCodec:
    """The AE as the dataset's latent encoder; ``*_flux.npz`` caches hold scaled latents, as upstream's."""
    return AutoEncoderLatentCodec(ae, "flux", scaled=True, sample=sample)


class FluxTextCodec:
    """CLIP-L + T5-XXL as the dataset's text encoder; cache files as upstream writes them (``*_flux_te.npz`` with
    ``apply_t5_attn_mask``), the T5 length checked from the stored shapes."""

    cache_suffix = "flux"
    text_cache_keys = TEXT_KEYS

    def __init__(self, text: FluxTextEncoder):
        self.text = text

    @property
    def text_cache_fingerprint(self) -> dict[str, object]:
        return {"apply_t5_attn_mask": self.text.apply_t5_attn_mask}

    @property
    def text_cache_shapes(self) -> dict[str, tuple[int | None, ...]]:
        length = self.text.t5_max_length
        return {"t5_out": (length, None), "txt_ids": (length, 3), "t5_attn_mask": (length,)}

    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        device = next(self.text.t5.parameters()).device
        cond = self.text.encode(captions, device)
        return {key: getattr(cond, key) for key in TEXT_KEYS}


class FluxFamily:
    """Holds the four FLUX.1 models and does everything model-specific for training and sampling."""

    def __init__(self, flux: Flux, ae: AutoEncoder, text: FluxTextEncoder, guidance_scale: float, model_type: str,
                 latent_samples: bool = True, block_swaps: list[BlockSwap] | None = None):  # fmt: skip
        self.flux, self.ae, self.text = flux, ae, text
        self.block_swaps = block_swaps or []
        self.controlnet: FluxControlNet | None = None
        self.guidance_scale = guidance_scale
        self.model_type = model_type
        self.latent_codec = flux_latent_codec(ae, latent_samples)
        self.text_codec = FluxTextCodec(text)

    @property
    def variant(self) -> str:
        return self.flux.params.variant

    @property
    def denoiser(self) -> nn.Module:
        return self.flux

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.flux.double_blocks, *self.flux.single_blocks]

    @property
    def vae(self) -> nn.Module:
        return self.ae

    @property
    def text_encoders(self) -> list[nn.Module | None]:
        return [self.text.clip_l, self.text.t5]

    text_encoder_names = ["CLIP-L", "T5-XXL"]
    live_text_encoders = frozenset({0})

    def describe(self) -> str:
        return f"FLUX.1 {self.variant}"

    def metadata(self) -> dict[str, object]:
        return {"ss_base_model_version": "flux1", "ss_model_type": self.model_type,
                "ss_apply_t5_attn_mask": self.text.apply_t5_attn_mask}  # fmt: skip

    def modelspec_architecture(self, adapter: str | None) -> str:
        base = f"flux-1-{self.variant}"
        return f"{base}/{adapter}" if adapter else base

    def modelspec_implementation(self, adapter: str | None) -> str:
        return MODELSPEC_IMPLEMENTATION

    def modelspec_prediction_type(self) -> str | None:
        return None  # upstream writes none for FLUX.1

    text_encoder_file_names = ["clip_l", "t5xxl"]

    def attach_controlnet(self, controlnet: nn.Module) -> None:
        self.controlnet = controlnet

    def save_controlnet(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        """XLabs' layout, which ComfyUI and x-flux load."""
        save_flux_controlnet(self.controlnet, path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)

    def save_checkpoint(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        """One BFL-layout file, as ComfyUI and diffusers' single-file loader take it."""
        from library.models.flux.saving import save_flux_checkpoint

        save_flux_checkpoint(self.flux, path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)

    def save_text_encoder(self, index: int, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                          mem_eff: bool) -> None:  # fmt: skip
        from library.models.text_encoders.saving import save_text_encoder

        save_text_encoder(self.text_encoders[index], path, kind=self.text_encoder_file_names[index], dtype=dtype,
                          metadata=metadata, mem_eff=mem_eff)  # fmt: skip

    def offload_text_encoders(self) -> None:
        for encoder in self.text_encoders:
            encoder.to("cpu")

    # --- latents and text (uncached batches, sampling) ---
    def to_model_latents(self, latents: Tensor) -> Tensor:
        return latents  # the AE's encode already scales and shifts: the cache holds model-space latents

    def encode_latents(self, images: Tensor, keys: list[tuple] | None = None) -> Tensor:
        return self.latent_codec.encode_latents(images, keys)

    def encode_text(self, captions: list[str], cached: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if cached is None:
            return self.text_codec.encode_text(captions)
        device = next(self.text.clip_l.parameters()).device
        return {**cached, "l_pooled": self.text.encode_clip(captions, device)}

    def augment_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        return text

    # --- the loop's view ---
    def predict(self, inputs: ModelInput, dtype: torch.dtype) -> Tensor:
        """The velocity prediction [B, 16, H, W] for latents [B, 16, H, W] at times ``t`` [B]."""
        noisy, text = inputs.noisy_latents, inputs.text
        batch, _, height, width = noisy.shape
        device = noisy.device
        guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=dtype)
        mask = text["t5_attn_mask"].to(device) if self.text.apply_t5_attn_mask else None
        kwargs = dict(
            img=pack_latents(noisy.to(dtype)), img_ids=prepare_img_ids(batch, height, width, device).to(dtype),
            txt=text["t5_out"].to(device, dtype), txt_ids=text["txt_ids"].to(device, dtype),
            y=text["l_pooled"].to(device, dtype), timesteps=inputs.timesteps.to(device, dtype),
            guidance=guidance if self.flux.params.guidance_embed else None, txt_attention_mask=mask,
        )  # fmt: skip
        samples = None
        if self.controlnet is not None:
            if inputs.control is None:
                raise UserError("the ControlNet needs a control image for every training image (conditioning_data_dir)")
            samples = self.controlnet(controlnet_cond=inputs.control.to(device, dtype), **kwargs)
        pred = self.flux(**kwargs, controlnet_block_samples=samples)
        return unpack_latents(pred, height, width)

    @staticmethod
    def image_seq_len(latents: Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    @torch.no_grad()
    def sample_image(self, prompt: SamplePrompt, seed: int, dtype: torch.dtype) -> Image.Image:
        device = next(self.flux.parameters()).device
        cond = FluxTextConditioning(**self.encode_text([prompt.prompt]))
        negative = None
        scale = prompt.scale_or(1.0)
        if scale != 1.0:
            negative = FluxTextConditioning(**self.encode_text([prompt.negative_prompt or ""]))
        settings = SampleSettings(
            width=16 * math.ceil(prompt.width / 16), height=16 * math.ceil(prompt.height / 16),
            steps=prompt.steps_or(20), guidance=prompt.guidance_scale, seed=seed, cfg_scale=scale,
        )  # fmt: skip
        control = None
        if self.controlnet is not None and prompt.controlnet_image:
            hint = control_hint(open_control_image(prompt.controlnet_image, "--cn"), settings.width, settings.height)
            control = ControlNetInput(self.controlnet, hint.to(device))
        with contextlib.ExitStack() as stack:
            for swap in self.block_swaps:
                stack.enter_context(swap.forward_only())
            latents = sample_latents(self.flux, cond.to(device), settings, dtype, negative and negative.to(device),
                                     False, control=control)  # fmt: skip
        return decode_images(self.ae, latents)[0]


def load_flux_text_encoder(
    files: FluxModelFiles,
    text_settings: FluxTextSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    is_schnell: bool,
) -> FluxTextEncoder:
    """CLIP-L, T5-XXL and their tokenizers, frozen; the T5 length defaults by variant (256 schnell, 512 dev)."""
    clip_l = load_clip_text_model(files.clip_l, dtype=dtype, device=device, option="--clip_l")
    t5 = load_t5_encoder(files.t5xxl, dtype=dtype, device=device, option="--t5xxl")
    for module in (clip_l, t5):
        module.requires_grad_(False).eval()
    return FluxTextEncoder(
        clip_l, t5, load_clip_tokenizer(files.clip_l_tokenizer), load_t5_tokenizer(files.t5xxl_tokenizer),
        text_settings.t5xxl_max_token_length or default_t5_max_length(is_schnell), text_settings.apply_t5_attn_mask,
    )  # fmt: skip


def load_flux_ae(path: str, *, dtype: torch.dtype, device: torch.device) -> AutoEncoder:
    return load_autoencoder(path, dtype=dtype, device=device, option="--ae").requires_grad_(False).eval()


def checkpoint_is_schnell(path: str) -> bool:
    """Whether the FLUX.1 checkpoint is schnell (no guidance embedding), from its header alone."""
    return not open_flux_checkpoint(path).params.guidance_embed


def load_flux_family(
    files: FluxModelFiles,
    text_settings: FluxTextSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    fp8_base: bool,
    guidance_scale: float,
    model_type: str = "flux",
    latent_samples: bool = True,
    flux_dtype: torch.dtype | None = None,
    blocks_to_swap: int = 0,
) -> FluxFamily:
    """Load all four models onto ``device`` (weights in ``dtype``, the transformer in ``flux_dtype`` if given; FLUX
    block Linears in fp8 with ``fp8_base``; with ``blocks_to_swap`` the last blocks' weights stay in host memory)."""
    swap = flux_swap_plan(open_flux_checkpoint(files.flux).params, blocks_to_swap)
    flux = load_flux_model(files.flux, dtype=flux_dtype or dtype, device="cpu" if blocks_to_swap else device,
                           fp8_linear=fp8_base)  # fmt: skip
    if fp8_base:
        logger.info("fp8 base: %d FLUX Linear layers store float8_e4m3fn weights", enable_fp8_linear(flux))
    ae = load_flux_ae(files.ae, dtype=dtype, device=device)
    text = load_flux_text_encoder(files, text_settings, dtype=dtype, device=device,
                                  is_schnell=not flux.params.guidance_embed)  # fmt: skip
    swaps = swap_blocks(flux, [(flux.double_blocks, swap[0], "double blocks"),
                               (flux.single_blocks, swap[1], "single blocks")], device) if blocks_to_swap else []  # fmt: skip
    return FluxFamily(flux, ae, text, guidance_scale, model_type, latent_samples, swaps)


def flux_swap_plan(params: FluxParams, blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks to swap for --blocks_to_swap N: a double block counts as two single ones, as
    upstream (N <= 35 for the real 19 + 38 blocks); UserError beyond the limits."""
    return split_flux_swap(blocks_to_swap, params.depth, params.depth_single_blocks)


# --- the family as a recipe is given it ---

FLUX_UNSUPPORTED = {"vae": "is for SD models; give the FLUX.1 AE with --ae"}


def add_flux_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FLUX.1 models")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="FLUX.1 dev/schnell checkpoint or diffusers folder")  # fmt: skip
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder (.safetensors)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL encoder (.safetensors)")
    g.add_argument("--ae", type=str, default=None, help="FLUX.1 autoencoder (ae.safetensors)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default 256 for schnell, 512 for dev")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in encoding and attention")
    g.add_argument("--clip_l_tokenizer", type=str, default=None, help="folder with another CLIP-L tokenizer")
    g.add_argument("--t5xxl_tokenizer", type=str, default=None, help="folder with another T5 tokenizer")
    g.add_argument("--model_type", type=str, default="flux", choices=["flux"], help="model family (flux)")


def add_flux_objective_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FLUX.1 timesteps and prediction")
    g.add_argument(
        "--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"], default="sigma"
    )
    g.add_argument("--sigmoid_scale", type=float, default=1.0)
    g.add_argument("--discrete_flow_shift", type=float, default=3.0)
    g.add_argument("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled")
    g.add_argument("--guidance_scale", type=float, default=3.5, help="guidance value fed to FLUX.1 dev while training")


def flux_files(args: argparse.Namespace) -> FluxModelFiles:
    return FluxModelFiles(args.pretrained_model_name_or_path, args.clip_l, args.t5xxl, args.ae, args.clip_l_tokenizer,
                          args.t5xxl_tokenizer)  # fmt: skip


def flux_text_settings(args: argparse.Namespace) -> FluxTextSettings:
    return FluxTextSettings(args.t5xxl_max_token_length, args.apply_t5_attn_mask)


class FluxSpec:
    """FLUX.1 (dev, schnell) for the training recipes."""

    name = "FLUX.1"
    network_module = "networks.lora_flux"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_flux_model_args(parser)
        add_flux_objective_args(parser)
        add_unsupported_args(parser, FLUX_UNSUPPORTED)

    def check_args(self, args: argparse.Namespace) -> None:
        required = {"pretrained_model_name_or_path": "the FLUX.1 checkpoint", "clip_l": "CLIP-L", "t5xxl": "T5-XXL",
                    "ae": "the AE"}  # fmt: skip
        for option, what in required.items():
            if not getattr(args, option):
                raise UserError(f"--{option} is required ({what})")

    def objective(self, args: argparse.Namespace) -> ObjectiveConfig:
        return objective_config(args, timestep_sampling=args.timestep_sampling, sigmoid_scale=args.sigmoid_scale,
                                   discrete_flow_shift=args.discrete_flow_shift,
                                   model_prediction_type=args.model_prediction_type)  # fmt: skip

    def metadata(self, args: argparse.Namespace) -> dict[str, object]:
        return {"ss_guidance_scale": args.guidance_scale, "ss_timestep_sampling": args.timestep_sampling,
                "ss_sigmoid_scale": args.sigmoid_scale, "ss_model_prediction_type": args.model_prediction_type,
                "ss_discrete_flow_shift": args.discrete_flow_shift}  # fmt: skip

    def add_finetune_args(self, parser: argparse.ArgumentParser) -> None:
        """flux_train.py trains the transformer only, as upstream's."""

    def finetune_text_encoders(self, args: argparse.Namespace) -> dict[int, float]:
        return {}

    def load(self, args: argparse.Namespace, options: LoadOptions) -> FluxFamily:
        return load_flux_family(
            flux_files(args), flux_text_settings(args), dtype=options.dtype, device=options.device,
            fp8_base=options.fp8_base, guidance_scale=args.guidance_scale, model_type=args.model_type,
            latent_samples=options.latent_samples, flux_dtype=options.denoiser_dtype,
            blocks_to_swap=options.blocks_to_swap,
        )  # fmt: skip

    def make_controlnet(self, args: argparse.Namespace, family: FluxFamily, *, trained: bool) -> FluxControlNet:
        """--controlnet_model_name_or_path (an XLabs-layout file, checked against the base model), or a new one of
        --controlnet_depth double blocks, --controlnet_init_from_base copying the base's weights (as XLabs does)."""
        path = args.controlnet_model_name_or_path
        if path:
            params = open_flux_controlnet(path, "--controlnet_model_name_or_path")[1]
            check_controlnet_fits(params, family.flux.params, f"--controlnet_model_name_or_path {path}")
            device = next(family.flux.img_in.parameters()).device
            dtype = family.flux.img_in.weight.dtype if not trained else torch.float32
            controlnet = load_flux_controlnet(path, dtype=dtype, device=device)
        elif trained:
            controlnet = new_flux_controlnet(family.flux, depth=args.controlnet_depth,
                                             init_from_base=args.controlnet_init_from_base).float()  # fmt: skip
        else:
            raise UserError("--controlnet_model_name_or_path is required")
        controlnet.requires_grad_(trained).train(trained)
        logger.info("ControlNet: %d double blocks, %s%s", len(controlnet.double_blocks),
                    f"from {path}" if path else "new", "" if trained else " (frozen)")  # fmt: skip
        return controlnet

    def memory_architecture(self, args: argparse.Namespace) -> Architecture:
        return read_architecture("flux", args.pretrained_model_name_or_path, clip_l=args.clip_l, t5xxl=args.t5xxl,
                                 vae=args.ae)  # fmt: skip

    def load_latent_codec(self, args: argparse.Namespace, options: LoadOptions) -> AutoEncoderLatentCodec:
        if not args.ae:
            raise UserError("--ae is required (the AE)")
        return flux_latent_codec(load_flux_ae(args.ae, dtype=options.dtype, device=options.device), options.latent_samples)

    def load_text_codec(self, args: argparse.Namespace, options: LoadOptions) -> FluxTextCodec:
        required = {"clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
        if args.t5xxl_max_token_length is None:
            required["pretrained_model_name_or_path"] = "the FLUX.1 checkpoint, to tell dev from schnell"
        for option, what in required.items():
            if not getattr(args, option):
                raise UserError(f"--{option} is required ({what})")
        is_schnell = args.t5xxl_max_token_length is None and checkpoint_is_schnell(args.pretrained_model_name_or_path)
        text = load_flux_text_encoder(flux_files(args), flux_text_settings(args), dtype=options.dtype,
                                      device=options.device, is_schnell=is_schnell)  # fmt: skip
        return FluxTextCodec(text)


FLUX = FluxSpec()
