"""flux_minimal_inference.py's options and what it runs: load the four models, generate, write a PNG."""

from __future__ import annotations

import argparse
import datetime
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from library.dtypes import parse_dtype
from library.errors import UserError
from library.inference.flux_generate import SampleSettings, decode_images, on_device, sample_latents, save_png
from library.memory.fp8 import cast_linear_weights_to_fp8, enable_fp8_linear, is_fp8
from library.models.autoencoder.loading import load_autoencoder
from library.models.flux.loading import load_flux_model
from library.models.flux.text_conditioning import FluxTextEncoder, default_t5_max_length
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder
from library.models.text_encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer

logger = logging.getLogger(__name__)


def add_flux_inference_args(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--ckpt_path", "--ckpt", required=True, help="FLUX.1 dev/schnell checkpoint or diffusers folder"
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
        help="LoRA files (networks.lora_flux, text-encoder parts included), each 'path;multiplier' (default 1.0)",
    )  # fmt: skip
    lora.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRAs into the weights")


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
    for option in ("width", "height"):
        if getattr(args, option) < 16:
            raise UserError(f"--{option} {getattr(args, option)}: must be at least 16 pixels")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")


def _fp8(module: torch.nn.Module, dtype: torch.dtype) -> None:
    if is_fp8(dtype):
        cast_linear_weights_to_fp8(module, dtype, exclude=(".wo",))
        enable_fp8_linear(module)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``"file.safetensors;0.8"`` -> (path, 0.8); no multiplier means 1.0."""
    path, sep, multiplier = spec.rpartition(";") if ";" in spec else (spec, "", "1.0")
    try:
        return path, float(multiplier)
    except ValueError:
        raise UserError(f"--lora_weights {spec!r}: multiplier {multiplier!r} is not a number (use path;0.8)") from None


def apply_loras(
    specs: list[str], flux: torch.nn.Module, text_encoders: list[torch.nn.Module], merge: bool, device: torch.device
) -> None:
    """Attach (or merge) each LoRA; a file that does not fit the model is a UserError naming it. Attached LoRA
    weights live on the compute ``device`` (they are small), so they work with --offload too."""
    from networks import lora_flux

    for spec in specs:
        path, multiplier = parse_lora_spec(spec)
        if not Path(path).is_file():
            raise UserError(f"--lora_weights {path}: file not found")
        network, weights = lora_flux.create_network_from_weights(
            multiplier, path, None, text_encoders, flux, for_inference=True
        )
        if merge:
            network.merge_to(text_encoders, flux, weights)
        else:
            network.apply_to(text_encoders, flux)
            network.load_weights(weights)
            network.to(device)
        logger.info(
            "LoRA %s x %s: %d modules %s", path, multiplier, len(network.loras), "merged" if merge else "applied"
        )


def run_flux_inference(args: argparse.Namespace) -> Path:
    _validate(args)
    precision = Precision.from_args(args)
    device = _device(args.device)
    load_device = "cpu" if args.offload else device
    model = load_flux_model(
        args.ckpt_path, dtype=precision.load_dtype("flux"), device=load_device, fp8_linear=is_fp8(precision.flux),
        option="--ckpt_path",
    )  # fmt: skip
    enable_fp8_linear(model)
    is_schnell = not model.params.guidance_embed
    clip_l = load_clip_text_model(
        args.clip_l, dtype=precision.load_dtype("clip_l"), device=load_device, option="--clip_l"
    )
    t5 = load_t5_encoder(args.t5xxl, dtype=precision.load_dtype("t5xxl"), device=load_device, option="--t5xxl")
    ae = load_autoencoder(args.ae, dtype=precision.load_dtype("ae"), device=load_device, option="--ae")
    _fp8(clip_l, precision.clip_l)
    _fp8(t5, precision.t5xxl)
    apply_loras(args.lora_weights, model, [clip_l, t5], args.merge_lora_weights, device)
    max_length = args.t5xxl_max_token_length or default_t5_max_length(is_schnell)
    encoder = FluxTextEncoder(
        clip_l, t5, load_clip_tokenizer(args.clip_l_tokenizer), load_t5_tokenizer(args.t5xxl_tokenizer),
        max_length, args.apply_t5_attn_mask,
    )  # fmt: skip

    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    settings = SampleSettings(args.width, args.height, args.steps, args.guidance, seed, args.cfg_scale)
    logger.info(
        "FLUX.1 %s on %s, %dx%d, %d steps, guidance %s, seed %d", model.params.variant, device, args.width,
        args.height, settings.steps_for(is_schnell), args.guidance, seed,
    )  # fmt: skip
    with on_device(clip_l, device, args.offload), on_device(t5, device, args.offload), torch.no_grad():
        cond = encoder.encode([args.prompt], device)
        negative = encoder.encode([args.negative_prompt or ""], device) if args.cfg_scale != 1.0 else None
    with on_device(model, device, args.offload):
        latents = sample_latents(model, cond, settings, precision.load_dtype("flux"), negative)
    with on_device(ae, device, args.offload):
        image = decode_images(ae, latents)[0]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    path = save_png(image, Path(args.output_dir) / f"{stamp}_{seed}.png", {"prompt": args.prompt, "seed": str(seed)})
    logger.info("saved %s", path)
    return path
