"""sd3_minimal_inference.py's options and what it runs: find the SD3/SD3.5 components in the files given, load them
once, generate ``--prompt`` (or, with ``--interactive``, every prompt typed) and write PNGs.

Options, defaults and output names are upstream's (kohya-ss sd-scripts ``sd3_minimal_inference.py``), plus ``--vae``
(upstream needs the VAE inside ``--ckpt_path``), ``--device`` and ``--blocks_to_swap``. Unlike upstream, ``--clip_g``
and ``--t5xxl`` win over encoders embedded in the checkpoint, and the noise comes from a CPU generator, so a seed
gives the image that training's sample images give for the same prompt and settings.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from library.errors import UserError
from library.inference.denoiser_swap import DenoiserPlacement, add_blocks_to_swap_arg
from library.inference.flux_cli import UpstreamSpellingParser
from library.inference.images import free_png_path, on_device, save_png
from library.inference.interactive import ImageRequest, InlineOptionError, run_prompt_loop
from library.inference.lora_files import apply_lora_files, network_from_weights_for, set_lora_multipliers
from library.inference.sd3_generate import SD3SampleSettings, decode_sd3_images, sample_sd3_latents, sd3_image_size
from library.memory.block_swap import check_num_swap
from library.models.sd3.components import SD3TextSettings, check_text_fits, load_sd3_text_encoder, resolve_sd3_files
from library.models.sd3.loading import load_sd3_mmdit, load_sd3_vae
from library.models.sd3.model import MMDiT, SD3Params
from library.models.sd3.text_conditioning import SD3TextEncoder

if TYPE_CHECKING:
    from networks.lora import LoRANetwork

logger = logging.getLogger(__name__)

CHECKPOINT_OPTION = "--ckpt_path"
NO_GUIDANCE = math.nan  # SD3 has no distilled guidance: the interactive --g must stay unset


def add_sd3_inference_args(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(CHECKPOINT_OPTION, type=str, required=True,
                        help="SD3/SD3.5 checkpoint (.safetensors), with or without embedded text encoders and VAE")  # fmt: skip
    models.add_argument("--clip_g", type=str, default=None, help="CLIP-G (optional when embedded in the checkpoint)")
    models.add_argument("--clip_l", type=str, default=None, help="CLIP-L (optional when embedded in the checkpoint)")
    models.add_argument("--t5xxl", type=str, default=None, help="T5-XXL (optional when embedded in the checkpoint)")
    models.add_argument("--vae", type=str, default=None,
                        help="SD3 VAE (optional when the checkpoint holds one, first_stage_model.*)")  # fmt: skip
    text = parser.add_argument_group("text encoding")
    text.add_argument("--t5xxl_token_length", type=int, default=256, help="t5xxl token length, default: 256")
    text.add_argument("--apply_lg_attn_mask", action="store_true", help="mask CLIP-L/G padding inside the encoders")
    text.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding inside the encoder")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompt", type=str, default="A photo of a cat")
    gen.add_argument("--negative_prompt", type=str, default="")
    gen.add_argument("--cfg_scale", type=float, default=5.0, help="classifier-free guidance scale (1 skips it)")
    gen.add_argument("--output_dir", type=str, default=".", help="folder for the PNGs")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--width", type=int, default=1024, help="rounded down to a multiple of 16")
    gen.add_argument("--height", type=int, default=1024, help="rounded down to a multiple of 16")
    gen.add_argument("--interactive", action="store_true",
                     help="load the models once, then read prompts from the terminal (inline --w --h --s --d --c "
                     "--m --n)")  # fmt: skip
    memory = parser.add_argument_group("precision and memory")
    memory.add_argument("--fp16", action="store_true", help="every model in float16 (default float32)")
    memory.add_argument("--bf16", action="store_true", help="every model in bfloat16 (default float32)")
    memory.add_argument("--offload", action="store_true",
                        help="keep models on the CPU and move each to the device only while it runs")  # fmt: skip
    add_blocks_to_swap_arg(memory, "joint blocks; at most depth - 2: 22 for SD3 Medium and SD3.5 Medium, 36 for "
                           "SD3.5 Large")  # fmt: skip
    memory.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_weights", type=str, nargs="*", default=[], metavar="PATH;MULTIPLIER",
                      help="LoRA files (networks.lora_sd3, text-encoder parts included), each 'path;multiplier' "
                      "(default 1.0)")  # fmt: skip
    lora.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """sd3_minimal_inference.py's parser; ``--blocks_to_swap`` (not upstream's) only in full, so ``--b`` stays
    upstream's ``--bf16``."""
    parser = UpstreamSpellingParser(description=description, full_only=("blocks_to_swap",))
    add_sd3_inference_args(parser)
    return parser


def _dtype(args: argparse.Namespace) -> torch.dtype:
    if args.fp16 and args.bf16:
        raise UserError("--fp16 and --bf16: give one of them (or neither for float32)")
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validate(args: argparse.Namespace) -> None:
    for option in ("width", "height"):
        if getattr(args, option) < 16:
            raise UserError(f"--{option} {getattr(args, option)}: must be at least 16 pixels")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    if args.t5xxl_token_length < 1:
        raise UserError(f"--t5xxl_token_length {args.t5xxl_token_length}: must be at least 1")
    _dtype(args)


def _size_error(params: SD3Params, width: int, height: int) -> str | None:
    """Why the MMDiT cannot make a ``width`` x ``height`` image (its position table's limit), or None."""
    width, height = sd3_image_size(width, height)
    if max(width, height) > params.max_image_size:
        return f"{width}x{height}: {params.display_name} makes at most {params.max_image_size} px per side"
    return None


@dataclass
class SD3Pipeline:
    """The loaded models and how to run them; built once, used for every image."""

    mmdit: MMDiT
    vae: nn.Module
    text: SD3TextEncoder
    loras: list[LoRANetwork]
    loras_merged: bool
    dtype: torch.dtype
    device: torch.device
    offload: bool
    denoiser: DenoiserPlacement


def load_pipeline(args: argparse.Namespace) -> SD3Pipeline:
    """Load the models (the MMDiT in host memory with ``--blocks_to_swap``), apply or merge the LoRAs, then attach
    the block swap: merging writes the weights the swap moves."""
    dtype, device = _dtype(args), _device(args.device)
    load_device = torch.device("cpu") if args.offload else device
    files = resolve_sd3_files(args.ckpt_path, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl, vae=args.vae,
                              checkpoint_option=CHECKPOINT_OPTION)  # fmt: skip
    error = _size_error(files.checkpoint.params, args.width, args.height)
    if error:
        raise UserError(f"--width/--height {error}")
    swap = args.blocks_to_swap or 0
    check_num_swap(swap, files.checkpoint.params.depth, "joint blocks")
    mmdit = load_sd3_mmdit(files.checkpoint.path, dtype=dtype, device="cpu" if swap else load_device,
                           option=CHECKPOINT_OPTION)  # fmt: skip
    vae = load_sd3_vae(files.vae.path, dtype=dtype, device=load_device, option=files.vae.option)
    settings = SD3TextSettings(args.t5xxl_token_length, args.apply_lg_attn_mask, args.apply_t5_attn_mask)
    text = load_sd3_text_encoder(files, settings, dtype=dtype, device=load_device)
    check_text_fits(mmdit, text, files)

    loras = apply_lora_files(args.lora_weights, network_from_weights_for("networks.lora_sd3"), mmdit,
                             [text.clip_l, text.clip_g, text.t5], args.merge_lora_weights, device)  # fmt: skip
    denoiser = DenoiserPlacement(mmdit, [(mmdit.joint_blocks, swap, "joint blocks")], device, args.offload)
    logger.info("%s loaded on %s, %s", mmdit.params.display_name, denoiser.describe(), dtype)
    return SD3Pipeline(mmdit, vae, text, loras, args.merge_lora_weights, dtype, device, args.offload, denoiser)


def _check_request(pipe: SD3Pipeline, request: ImageRequest) -> None:
    """Inline options SD3 cannot follow (the command line's were checked before loading)."""
    if not math.isnan(request.guidance):
        raise InlineOptionError("--g: SD3 has no distilled guidance; --c sets the CFG scale")
    error = _size_error(pipe.mmdit.params, request.width, request.height)
    if error:
        raise InlineOptionError(f"--w/--h {error}")


@torch.no_grad()
def generate(pipe: SD3Pipeline, request: ImageRequest, output_dir: str | Path) -> Path:
    """Generate one image and write it as a PNG in ``output_dir``, named as upstream names it; returns its path."""
    _check_request(pipe, request)
    set_lora_multipliers(pipe.loras, request.lora_multipliers, pipe.loras_merged)
    seed = request.seed if request.seed is not None else random.randint(0, 2**32 - 1)
    settings = SD3SampleSettings(request.width, request.height, request.steps, request.cfg_scale, seed)
    width, height = settings.image_size
    logger.info("%dx%d, %d steps, cfg %s, seed %d: %s", width, height, settings.steps, settings.cfg_scale, seed,
                request.prompt)  # fmt: skip
    device, offload, text = pipe.device, pipe.offload, pipe.text
    with on_device(text.clip_l, device, offload), on_device(text.clip_g, device, offload):
        with on_device(text.t5, device, offload):
            cond = text.encode([request.prompt], device).model_inputs()
            negative = None
            if settings.cfg_scale != 1.0:
                negative = text.encode([request.negative_prompt or ""], device).model_inputs()
    with pipe.denoiser.sampling():
        latents = sample_sd3_latents(pipe.mmdit, cond, negative, settings, pipe.dtype)
    with on_device(pipe.vae, device, offload):
        image = decode_sd3_images(pipe.vae, latents)[0]
    metadata = {"prompt": request.prompt, "negative_prompt": request.negative_prompt or "", "seed": str(seed),
                "steps": str(settings.steps), "cfg_scale": str(settings.cfg_scale)}  # fmt: skip
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = save_png(image, free_png_path(Path(output_dir), stamp), metadata)
    logger.info("saved %s", path)
    return path


def run_sd3_inference(args: argparse.Namespace) -> list[Path]:
    """Load the models once, then generate ``--prompt`` or, with ``--interactive``, every prompt typed."""
    _validate(args)
    pipe = load_pipeline(args)
    request = ImageRequest(args.prompt, args.negative_prompt, args.seed, args.width, args.height, args.steps,
                           NO_GUIDANCE, args.cfg_scale)  # fmt: skip
    if not args.interactive:
        return [generate(pipe, request, args.output_dir)]
    paths: list[Path] = []
    run_prompt_loop(request, lambda r: paths.append(generate(pipe, r, args.output_dir)))
    return paths
