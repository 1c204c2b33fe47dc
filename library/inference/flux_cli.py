"""flux_minimal_inference.py's options and what it runs: load the four models, generate, write a PNG."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from library.dtypes import parse_dtype
from library.errors import UserError
from library.inference.denoiser_swap import DenoiserPlacement, add_blocks_to_swap_arg
from library.inference.flux_generate import (
    ControlNetInput,
    SampleSettings,
    control_hint,
    open_control_image,
    sample_latents,
)
from library.inference.images import decode_images, free_png_path, on_device, save_png
from library.inference.interactive import ImageRequest, run_prompt_loop
from library.inference.lora_files import apply_lora_files, network_from_weights_for, set_lora_multipliers
from library.memory.block_swap import split_flux_swap
from library.memory.fp8 import cast_linear_weights_to_fp8, enable_fp8_linear, is_fp8
from library.models.autoencoder.loading import load_autoencoder
from library.models.flux.controlnet import FluxControlNet
from library.models.flux.controlnet_loading import check_controlnet_fits, load_flux_controlnet, open_flux_controlnet
from library.models.flux.loading import load_flux_model, open_flux_checkpoint
from library.models.flux.text_conditioning import FluxTextEncoder, default_t5_max_length
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder
from library.models.text_encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer

if TYPE_CHECKING:
    from PIL import Image

    from networks.lora import LoRANetwork

logger = logging.getLogger(__name__)


# Options upstream's script lacks: matched only when spelled in full, so no upstream abbreviation becomes ambiguous.
SUITE_ONLY_OPTIONS = (
    "clip_l_tokenizer", "t5xxl_tokenizer", "device", "t5xxl_max_token_length", "blocks_to_swap", "controlnet",
    "controlnet_image", "controlnet_scale",
)  # fmt: skip


class UpstreamSpellingParser(argparse.ArgumentParser):
    """argparse that accepts every abbreviation upstream's parser accepts: the aliases of one option never make its
    abbreviations ambiguous (``--ck`` is ``--ckpt_path`` although ``--ckpt`` exists too), and the options named in
    ``full_only`` are matched only when spelled in full (``--d`` stays ``--dtype`` despite ``--device``)."""

    def __init__(self, *args, full_only: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.full_only = set(full_only)

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        matches, seen = [], set()
        for match in super()._get_option_tuples(option_string):
            action = match[0]
            if action.dest not in self.full_only and id(action) not in seen:
                seen.add(id(action))
                matches.append(match)
        return matches


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """flux_minimal_inference.py's parser: upstream's options and spellings (``--ckpt``, ``--out``, ``--lora``)."""
    parser = UpstreamSpellingParser(description=description, full_only=SUITE_ONLY_OPTIONS)
    add_flux_inference_args(parser)
    return parser


def add_flux_inference_args(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--ckpt_path", "--ckpt", required=True, help="FLUX.1 dev/schnell checkpoint or diffusers folder"
    )
    models.add_argument(
        "--model_type", default="flux", choices=["flux", "chroma"], help="flux (Chroma is not supported)"
    )
    models.add_argument("--clip_l", required=True, help="CLIP-L text encoder (.safetensors)")
    models.add_argument("--t5xxl", required=True, help="T5-XXL encoder (.safetensors, fp16 or fp8)")
    models.add_argument("--ae", required=True, help="FLUX.1 autoencoder (ae.safetensors)")
    models.add_argument(
        "--clip_l_tokenizer", default=None, help="folder with another CLIP-L tokenizer (default: bundled)"
    )
    models.add_argument("--t5xxl_tokenizer", default=None, help="folder with another T5 tokenizer (default: bundled)")
    dtypes = parser.add_argument_group("precision and memory")
    dtypes.add_argument("--dtype", default="bfloat16", help="base dtype (fp32, fp16, bf16)")
    for name in ("clip_l", "t5xxl", "ae", "flux"):
        dtypes.add_argument(
            f"--{name}_dtype", default=None, help=f"dtype for {name} (default: --dtype); fp8 stores weights in float8"
        )
    dtypes.add_argument(
        "--offload", action="store_true", help="keep models on the CPU and move each to the GPU only while it runs"
    )
    add_blocks_to_swap_arg(dtypes, "a double block counts as two single blocks; at most 35 for FLUX.1")
    dtypes.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", default="A photo of a cat")
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument(
        "--cfg_scale", type=float, default=1.0, help="true classifier-free guidance with --negative_prompt"
    )
    gen.add_argument("--output_dir", "--out", default=".", help="folder for the PNG")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None, help="default 4 for schnell, 50 for dev")
    gen.add_argument("--guidance", type=float, default=3.5, help="distilled guidance (dev only)")
    gen.add_argument("--width", type=int, default=1360)
    gen.add_argument("--height", type=int, default=768)
    gen.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in encoding and attention")
    gen.add_argument("--t5xxl_max_token_length", type=int, default=None, help="default 256 for schnell, 512 for dev")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument(
        "--lora_weights", "--lora", nargs="*", default=[], metavar="PATH;MULTIPLIER",
        help="LoRA or OFT files (text-encoder parts included), each 'path;multiplier' (default 1.0)",
    )  # fmt: skip
    lora.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights")
    control = parser.add_argument_group("ControlNet")
    control.add_argument(
        "--controlnet", default=None, metavar="FILE",
        help="FLUX.1 ControlNet in XLabs' layout (flux_train_control_net.py's output or XLabs' releases)",
    )  # fmt: skip
    control.add_argument(
        "--controlnet_image", default=None, metavar="IMAGE",
        help="control image for --controlnet, resized to each image's size (LANCZOS); fixed for every prompt",
    )  # fmt: skip
    control.add_argument(
        "--controlnet_scale", type=float, default=None, help="strength of the ControlNet's residuals (default 1.0)"
    )
    parser.add_argument(
        "--interactive", action="store_true",
        help="load the models once, then read prompts from the terminal (inline --w --h --s --d --g --c --m --n)",
    )  # fmt: skip


@dataclass(frozen=True)
class Precision:
    """Storage dtype per model; fp8 means fp8 weights computed in ``compute``."""

    compute: torch.dtype
    clip_l: torch.dtype
    t5xxl: torch.dtype
    ae: torch.dtype
    flux: torch.dtype

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Precision:
        base = parse_dtype(args.dtype, "--dtype")
        compute = torch.bfloat16 if is_fp8(base) else base
        per_model = {
            n: parse_dtype(getattr(args, f"{n}_dtype"), f"--{n}_dtype", base) for n in ("clip_l", "t5xxl", "ae", "flux")
        }
        return cls(compute=compute, **per_model)

    def load_dtype(self, name: str) -> torch.dtype:
        dtype = getattr(self, name)
        return self.compute if is_fp8(dtype) else dtype


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validate(args: argparse.Namespace) -> None:
    if args.model_type != "flux":
        raise UserError(
            f"--model_type {args.model_type}: Chroma models are not supported; use a FLUX.1 dev/schnell checkpoint"
        )
    for option in ("width", "height"):
        if getattr(args, option) < 16:
            raise UserError(f"--{option} {getattr(args, option)}: must be at least 16 pixels")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    if bool(args.controlnet) != bool(args.controlnet_image):
        given, needed = (
            ("--controlnet", "--controlnet_image") if args.controlnet else ("--controlnet_image", "--controlnet")
        )
        raise UserError(f"{given} needs {needed} too")
    if args.controlnet_scale is not None and not args.controlnet:
        raise UserError("--controlnet_scale needs --controlnet too")


def _fp8(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if is_fp8(dtype):
        cast_linear_weights_to_fp8(module, dtype, exclude=(".wo",))
        enable_fp8_linear(module)


def apply_loras(
    specs: list[str], flux: torch.nn.Module, text_encoders: list[torch.nn.Module], merge: bool, device: torch.device
) -> list[LoRANetwork]:
    networks = network_from_weights_for("networks.lora_flux")  # networks.oft_flux for a file with OFT keys
    return apply_lora_files(specs, networks, flux, text_encoders, merge, device)


@dataclass
class FluxPipeline:
    """The loaded models and how to run them; built once, used for every image."""

    model: torch.nn.Module
    encoder: FluxTextEncoder
    ae: torch.nn.Module
    loras: list[LoRANetwork]
    loras_merged: bool
    compute_dtype: torch.dtype
    device: torch.device
    offload: bool
    denoiser: DenoiserPlacement
    controlnet: FluxControlNet | None = None
    control_image: Image.Image | None = None
    controlnet_scale: float = 1.0

    @property
    def is_schnell(self) -> bool:
        return not self.model.params.guidance_embed


def flux_swap_counts(ckpt_path: str, blocks_to_swap: int | None) -> tuple[int, int]:
    """(double, single) blocks to swap for ``--blocks_to_swap``, from the checkpoint's header (nothing loads)."""
    if not blocks_to_swap:
        return 0, 0
    params = open_flux_checkpoint(ckpt_path, "--ckpt_path").params
    return split_flux_swap(blocks_to_swap, params.depth, params.depth_single_blocks)


def _open_controlnet(args: argparse.Namespace) -> Image.Image | None:
    """The control image, and the ControlNet's header checked against the base model's: before anything loads."""
    if not args.controlnet:
        return None
    image = open_control_image(args.controlnet_image, "--controlnet_image")
    _, params = open_flux_controlnet(args.controlnet, "--controlnet")
    check_controlnet_fits(
        params, open_flux_checkpoint(args.ckpt_path, "--ckpt_path").params, f"--controlnet {args.controlnet}"
    )
    logger.info("ControlNet image %s (%dx%d)", args.controlnet_image, *image.size)
    return image


def load_pipeline(args: argparse.Namespace) -> FluxPipeline:
    """Load the four models (the transformer in host memory with ``--blocks_to_swap``) and the ControlNet, apply or
    merge the LoRAs, then attach the block swap: merging writes the weights the swap moves."""
    precision = Precision.from_args(args)
    device = _device(args.device)
    load_device = "cpu" if args.offload else device
    control_image = _open_controlnet(args)
    num_double, num_single = flux_swap_counts(args.ckpt_path, args.blocks_to_swap)
    model = load_flux_model(
        args.ckpt_path, dtype=precision.load_dtype("flux"), device="cpu" if num_double or num_single else load_device,
        fp8_linear=is_fp8(precision.flux), option="--ckpt_path",
    )  # fmt: skip
    enable_fp8_linear(model)
    clip_l = load_clip_text_model(
        args.clip_l, dtype=precision.load_dtype("clip_l"), device=load_device, option="--clip_l"
    )
    t5 = load_t5_encoder(args.t5xxl, dtype=precision.load_dtype("t5xxl"), device=load_device, option="--t5xxl")
    ae = load_autoencoder(args.ae, dtype=precision.load_dtype("ae"), device=load_device, option="--ae")
    _fp8(clip_l, precision.clip_l)
    _fp8(t5, precision.t5xxl)
    loras = apply_loras(args.lora_weights, model, [clip_l, t5], args.merge_lora_weights, device)
    max_length = args.t5xxl_max_token_length or default_t5_max_length(not model.params.guidance_embed)
    encoder = FluxTextEncoder(
        clip_l, t5, load_clip_tokenizer(args.clip_l_tokenizer), load_t5_tokenizer(args.t5xxl_tokenizer),
        max_length, args.apply_t5_attn_mask,
    )  # fmt: skip
    groups = [(model.double_blocks, num_double, "double blocks"), (model.single_blocks, num_single, "single blocks")]
    denoiser = DenoiserPlacement(model, groups, device, args.offload)
    logger.info("FLUX.1 %s loaded on %s", model.params.variant, denoiser.describe())
    controlnet = None
    if control_image is not None:
        controlnet = load_flux_controlnet(
            args.controlnet, dtype=precision.load_dtype("flux"), device=load_device, option="--controlnet"
        )
    return FluxPipeline(
        model, encoder, ae, loras, args.merge_lora_weights, precision.load_dtype("flux"), device, args.offload,
        denoiser, controlnet, control_image, 1.0 if args.controlnet_scale is None else args.controlnet_scale,
    )  # fmt: skip


def _control(pipe: FluxPipeline, request: ImageRequest) -> ControlNetInput | None:
    """The ControlNet with its image at this request's size (the image stays, the size may change per prompt)."""
    if pipe.controlnet is None:
        return None
    hint = control_hint(pipe.control_image, request.width, request.height)
    return ControlNetInput(pipe.controlnet, hint, pipe.controlnet_scale)


def generate(pipe: FluxPipeline, request: ImageRequest, output_dir: str | Path) -> Path:
    """Generate one image and write it as a PNG in ``output_dir``; returns its path."""
    set_lora_multipliers(pipe.loras, request.lora_multipliers, pipe.loras_merged)
    seed = request.seed if request.seed is not None else random.randint(0, 2**32 - 1)
    settings = SampleSettings(
        request.width, request.height, request.steps, request.guidance, seed, request.cfg_scale
    )  # fmt: skip
    logger.info(
        "%dx%d, %d steps, guidance %s, cfg %s, seed %d: %s", request.width, request.height,
        settings.steps_for(pipe.is_schnell), request.guidance, request.cfg_scale, seed, request.prompt,
    )  # fmt: skip
    clip_l, t5, device, offload = pipe.encoder.clip_l, pipe.encoder.t5, pipe.device, pipe.offload
    with on_device(clip_l, device, offload), on_device(t5, device, offload), torch.no_grad():
        cond = pipe.encoder.encode([request.prompt], device)
        negative = pipe.encoder.encode([request.negative_prompt or ""], device) if request.cfg_scale != 1.0 else None
    control = _control(pipe, request)
    controlnet_placement = (
        on_device(control.model, device, offload) if control is not None else contextlib.nullcontext()
    )
    with pipe.denoiser.sampling(), controlnet_placement:
        latents = sample_latents(pipe.model, cond, settings, pipe.compute_dtype, negative, control=control)
    with on_device(pipe.ae, device, offload):
        image = decode_images(pipe.ae, latents)[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = save_png(
        image, free_png_path(Path(output_dir), f"{stamp}_{seed}"), {"prompt": request.prompt, "seed": str(seed)}
    )
    logger.info("saved %s", path)
    return path


def run_flux_inference(args: argparse.Namespace) -> list[Path]:
    """Load the models once, then generate ``--prompt`` or, with ``--interactive``, every prompt typed."""
    _validate(args)
    pipe = load_pipeline(args)
    request = ImageRequest(
        args.prompt, args.negative_prompt, args.seed, args.width, args.height, args.steps, args.guidance,
        args.cfg_scale,
    )  # fmt: skip
    if not args.interactive:
        return [generate(pipe, request, args.output_dir)]
    paths: list[Path] = []
    run_prompt_loop(request, lambda r: paths.append(generate(pipe, r, args.output_dir)))
    return paths
