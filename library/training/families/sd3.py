"""SD3 / SD3.5 (Medium, Large, Large Turbo) as a model family for the training recipes: loading the files users
hold (an explicit option always wins over an encoder embedded in the checkpoint), the text and latent codecs in
upstream's cache formats, the prediction, sample images and metadata."""

from __future__ import annotations

import argparse
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from library.errors import UserError
from library.inference.images import decode_images
from library.inference.sd3_generate import SD3SampleSettings, sample_sd3_latents
from library.memory.block_swap import BlockSwap, check_num_swap, swap_blocks
from library.memory.estimate_models import Architecture, read_architecture
from library.memory.fp8 import enable_fp8_linear
from library.models.autoencoder.model import AutoEncoder
from library.models.sd3.components import (
    SD3Files,
    SD3TextSettings,
    check_text_fits,
    load_sd3_text_encoder,
    resolve_sd3_files,
)
from library.models.sd3.loading import load_sd3_mmdit, load_sd3_vae
from library.models.sd3.model import MODELSPEC_IMPLEMENTATION, MODELSPEC_LORA_IMPLEMENTATION, MMDiT
from library.models.sd3.pos_embed import ScaledPosEmbed, random_offset
from library.models.sd3.text_conditioning import (
    DEFAULT_T5_MAX_LENGTH,
    TEXT_CACHE_KEYS,
    SD3TextConditioning,
    SD3TextDropoutRates,
    SD3TextEncoder,
    apply_text_dropout,
    draw_text_dropout,
)
from library.training.args import add_unsupported_args, objective_config
from library.training.families.latents import AutoEncoderLatentCodec
from library.training.family import LoadOptions, ModelInput
from library.training.objective import ObjectiveConfig
from library.training.sample_prompts import SamplePrompt

logger = logging.getLogger(__name__)

CHECKPOINT_OPTION = "--pretrained_model_name_or_path"
SAMPLE_STEPS, SAMPLE_SCALE = 30, 7.5  # upstream's defaults for SD3 sample images during training


# --- codecs: the dataset's encoders, with upstream's cache files ---


def sd3_latent_codec(vae: AutoEncoder, sample: bool = True) -> AutoEncoderLatentCodec:
    """The SD VAE as the dataset's latent encoder. ``*_sd3.npz`` caches hold *unscaled* latents, as upstream writes
    them; :meth:`SD3Family.to_model_latents` scales them each step."""
    return AutoEncoderLatentCodec(vae, "sd3", scaled=False, sample=sample)


class SD3TextCodec:
    """CLIP-L + CLIP-G + T5-XXL as the dataset's text encoder: ``<stem>_sd3_te.npz`` with upstream's keys, the two
    mask flags stored and compared on reuse."""

    cache_suffix = "sd3"
    text_cache_keys = TEXT_CACHE_KEYS

    def __init__(self, text: SD3TextEncoder):
        self.text = text

    @property
    def text_cache_fingerprint(self) -> dict[str, object]:
        return {"apply_lg_attn_mask": self.text.apply_lg_attn_mask, "apply_t5_attn_mask": self.text.apply_t5_attn_mask}

    @property
    def text_cache_shapes(self) -> dict[str, tuple[int | None, ...]]:
        t5_length = self.text.t5_max_length if self.text.t5 is not None else None
        return {"lg_out": (77, None), "t5_out": (t5_length, self.text.context_width), "lg_pooled": (None,),
                "clip_l_attn_mask": (77,), "clip_g_attn_mask": (77,), "t5_attn_mask": (t5_length,)}  # fmt: skip

    def encode_text(self, captions: list[str]) -> dict[str, Tensor]:
        device = next(self.text.clip_l.parameters()).device
        return vars(self.text.encode(captions, device))


# --- the loaded family ---


@dataclass(frozen=True)
class SD3TrainSettings:
    dropout: SD3TextDropoutRates = SD3TextDropoutRates()
    pos_emb_random_crop_rate: float = 0.0
    scaled_pos_embed: ScaledPosEmbed | None = None
    latent_samples: bool = True


class SD3Family:
    """Holds the MMDiT, the VAE and the three text encoders and does everything SD3-specific."""

    def __init__(self, mmdit: MMDiT, vae: AutoEncoder, text: SD3TextEncoder, settings: SD3TrainSettings,
                 block_swaps: list[BlockSwap] | None = None):  # fmt: skip
        self.mmdit, self.ae, self.text, self.settings = mmdit, vae, text, settings
        self.block_swaps = block_swaps or []
        self.latent_codec = sd3_latent_codec(vae, settings.latent_samples)
        self.text_codec = SD3TextCodec(text)

    @property
    def denoiser(self) -> nn.Module:
        return self.mmdit

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.mmdit.joint_blocks)

    @property
    def vae(self) -> nn.Module:
        return self.ae

    @property
    def text_encoders(self) -> list[nn.Module | None]:
        return [self.text.clip_l, self.text.clip_g, self.text.t5]

    text_encoder_names = ["CLIP-L", "CLIP-G", "T5-XXL"]
    live_text_encoders = frozenset({0, 1})

    def describe(self) -> str:
        return self.mmdit.params.display_name

    def metadata(self) -> dict[str, object]:
        return {"ss_base_model_version": self.mmdit.params.variant,
                "ss_apply_lg_attn_mask": self.text.apply_lg_attn_mask,
                "ss_apply_t5_attn_mask": self.text.apply_t5_attn_mask}  # fmt: skip

    def modelspec_architecture(self, adapter: str | None) -> str:
        base = self.mmdit.params.modelspec_architecture
        return f"{base}/{adapter}" if adapter else base

    def modelspec_implementation(self, adapter: str | None) -> str:
        return MODELSPEC_LORA_IMPLEMENTATION if adapter else MODELSPEC_IMPLEMENTATION

    def modelspec_prediction_type(self) -> str | None:
        return "epsilon"  # what upstream writes for every model but FLUX.1

    text_encoder_file_names = ["clip_l", "clip_g", "t5xxl"]

    def attach_controlnet(self, controlnet: nn.Module) -> None:
        raise UserError("ControlNet training is for FLUX.1 here (flux_train_control_net.py)")

    def save_controlnet(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        raise UserError("ControlNet training is for FLUX.1 here (flux_train_control_net.py)")

    def save_checkpoint(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        """The SAI single file: the MMDiT under ``model.diffusion_model.`` and the VAE under ``first_stage_model.``."""
        from library.models.sd3.saving import save_sd3_checkpoint

        save_sd3_checkpoint(self.mmdit, self.ae, path, dtype=dtype, metadata=metadata, mem_eff=mem_eff)

    def save_text_encoder(self, index: int, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                          mem_eff: bool) -> None:  # fmt: skip
        from library.models.text_encoders.saving import save_text_encoder

        save_text_encoder(self.text_encoders[index], path, kind=self.text_encoder_file_names[index], dtype=dtype,
                          metadata=metadata, mem_eff=mem_eff)  # fmt: skip

    def offload_text_encoders(self) -> None:
        for encoder in self.text.text_encoders:
            encoder.to("cpu")

    def to_model_latents(self, latents: Tensor) -> Tensor:
        params = self.ae.params
        return (latents - params.shift_factor) * params.scale_factor

    def encode_latents(self, images: Tensor, keys: list[tuple] | None = None) -> Tensor:
        return self.latent_codec.encode_latents(images, keys)

    def encode_text(self, captions: list[str], cached: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if cached is None:
            return self.text_codec.encode_text(captions)
        device = next(self.text.clip_l.parameters()).device
        return {**cached, **self.text.encode_clip(captions, device)}

    def augment_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """--clip_l/--clip_g/--t5_dropout_rate: zero each encoder's part per sample, on cached outputs too."""
        if not self.settings.dropout.active:
            return text
        cond = SD3TextConditioning(**text)
        drop = draw_text_dropout(cond.lg_out.shape[0], self.settings.dropout)
        return vars(apply_text_dropout(cond, drop, self.text.clip_l_width))

    @staticmethod
    def image_seq_len(latents: Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def _pos_embed(self, height: int, width: int, random_crop: bool) -> Tensor | None:
        """The position table for latents of height x width: scaled tables, a random crop (one offset per batch,
        with probability --pos_emb_random_crop_rate), or None for the stored table's centre."""
        h, w = height // 2, width // 2
        scaled = self.settings.scaled_pos_embed
        grid = scaled.grid_size_for(h, w) if scaled else self.mmdit.params.pos_embed_max_size
        offset = None
        rate = self.settings.pos_emb_random_crop_rate
        if random_crop and rate and float(torch.rand(1)) < rate:
            offset = random_offset(grid, h, w)
        if scaled:
            return scaled.table_for(h, w, offset)
        return None if offset is None else self.mmdit.cropped_pos_embed(h, w, offset)

    def predict(self, inputs: ModelInput, dtype: torch.dtype) -> Tensor:
        """The velocity for latents [B, 16, H, W]; the MMDiT takes t = sigma * 1000."""
        noisy = inputs.noisy_latents
        device = noisy.device
        context, y = SD3TextConditioning(**inputs.text).model_inputs()
        pos_embed = self._pos_embed(noisy.shape[-2], noisy.shape[-1], random_crop=inputs.augment)
        return self.mmdit(noisy.to(dtype), (inputs.timesteps * 1000).to(device, dtype), y.to(device, dtype),
                          context.to(device, dtype), pos_embed=pos_embed)  # fmt: skip

    def model_fn(self, x: Tensor, timesteps: Tensor, y: Tensor, context: Tensor) -> Tensor:
        """The MMDiT as the sampler calls it, with this run's position tables (no random crop)."""
        return self.mmdit(x, timesteps, y, context, pos_embed=self._pos_embed(x.shape[-2], x.shape[-1], False))

    @torch.no_grad()
    def sample_image(self, prompt: SamplePrompt, seed: int, dtype: torch.dtype) -> Image.Image:
        device = next(self.mmdit.parameters()).device
        cond = self.text.encode([prompt.prompt], device).model_inputs()
        scale = prompt.scale_or(SAMPLE_SCALE)
        negative = self.text.encode([prompt.negative_prompt or ""], device).model_inputs() if scale != 1.0 else None
        settings = SD3SampleSettings(
            width=prompt.width, height=prompt.height, steps=prompt.steps_or(SAMPLE_STEPS), cfg_scale=scale, seed=seed,
        )  # fmt: skip
        with contextlib.ExitStack() as stack:
            for swap in self.block_swaps:
                stack.enter_context(swap.forward_only())
            latents = sample_sd3_latents(self.model_fn, cond, negative, settings, dtype, show_progress=False)
        return decode_images(self.ae, latents)[0]


def sd3_files(args: argparse.Namespace) -> SD3Files:
    return resolve_sd3_files(args.pretrained_model_name_or_path, clip_l=args.clip_l, clip_g=args.clip_g,
                             t5xxl=args.t5xxl, vae=args.vae, checkpoint_option=CHECKPOINT_OPTION)  # fmt: skip


def sd3_text_settings(args: argparse.Namespace) -> SD3TextSettings:
    return SD3TextSettings(args.t5xxl_max_token_length, args.apply_lg_attn_mask, args.apply_t5_attn_mask,
                           args.clip_l_tokenizer, args.clip_g_tokenizer, args.t5xxl_tokenizer)  # fmt: skip


def load_sd3_family(args: argparse.Namespace, options: LoadOptions) -> SD3Family:
    files = sd3_files(args)
    swap = options.blocks_to_swap
    if swap:
        check_num_swap(swap, files.checkpoint.params.depth, "joint blocks")
    mmdit = load_sd3_mmdit(files.checkpoint.path, dtype=options.denoiser_dtype or options.dtype,
                           device="cpu" if swap else options.device, fp8_linear=options.fp8_base,
                           option=CHECKPOINT_OPTION)  # fmt: skip
    if options.fp8_base:
        logger.info("fp8 base: %d MMDiT Linear layers store float8_e4m3fn weights", enable_fp8_linear(mmdit))
    vae = load_sd3_vae(files.vae.path, dtype=options.dtype, device=options.device, option=files.vae.option)
    trained = SD3.finetune_text_encoders(args) if options.text_encoder_dtype else {}
    dtypes = tuple(options.text_encoder_dtype if i in trained else None for i in range(3))
    text = load_sd3_text_encoder(files, sd3_text_settings(args), dtype=options.dtype, device=options.device,
                                 dtypes=dtypes)  # fmt: skip
    check_text_fits(mmdit, text, files)
    scaled = None
    if args.enable_scaled_pos_embed:
        scaled = ScaledPosEmbed.from_resolutions(mmdit.params.hidden_size, options.resolutions)
        logger.info("scaled position embeddings for training resolutions %s", list(options.resolutions))
    settings = SD3TrainSettings(
        SD3TextDropoutRates(args.clip_l_dropout_rate, args.clip_g_dropout_rate, args.t5_dropout_rate),
        args.pos_emb_random_crop_rate, scaled, options.latent_samples,
    )  # fmt: skip
    swaps = swap_blocks(mmdit, [(mmdit.joint_blocks, swap, "joint blocks")], options.device) if swap else []
    return SD3Family(mmdit, vae, text, settings, swaps)


# --- the family as a recipe is given it ---

SD3_UNSUPPORTED = {
    "timestep_sampling": "is FLUX.1's; SD3 draws timesteps from --weighting_scheme (--logit_mean, --logit_std, "
    "--mode_scale) shifted by --training_shift",
    "discrete_flow_shift": "is FLUX.1's; SD3 shifts timesteps with --training_shift",
    "sigmoid_scale": "belongs to FLUX.1's --timestep_sampling; SD3 uses --weighting_scheme",
    "model_prediction_type": "is FLUX.1's; SD3 always trains on the x0 estimate (upstream's preconditioning)",
    "guidance_scale": "is FLUX.1 dev's distilled guidance; SD3 has none (use --l in sample prompts for CFG)",
    "ae": "is FLUX.1's autoencoder; SD3 reads its VAE from the checkpoint, or from --vae",
    "t5xxl_device": "is marked [DOES NOT WORK] upstream; T5-XXL runs on the training device (cache its outputs "
    "with --cache_text_encoder_outputs to free that memory)",
    "t5xxl_dtype": "is marked [DOES NOT WORK] upstream; T5-XXL computes in --mixed_precision's dtype",
    "save_clip": "is marked [DOES NOT WORK] upstream; LoRA training leaves CLIP's weights unchanged (text-encoder "
    "LoRA parts are saved in the LoRA file)",
    "save_t5xxl": "is marked [DOES NOT WORK] upstream; LoRA training leaves T5-XXL's weights unchanged",
}


def add_sd3_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SD3/SD3.5 models")
    g.add_argument(f"{CHECKPOINT_OPTION}", type=str, default=None,
                   help="SD3/SD3.5 checkpoint (.safetensors), with or without embedded text encoders and VAE")  # fmt: skip
    g.add_argument("--clip_l", type=str, default=None, help="CLIP-L (optional when embedded in the checkpoint)")
    g.add_argument("--clip_g", type=str, default=None, help="CLIP-G (optional when embedded in the checkpoint)")
    g.add_argument("--t5xxl", type=str, default=None, help="T5-XXL (optional when embedded in the checkpoint)")
    g.add_argument("--vae", type=str, default=None, help="SD3 VAE (optional when the checkpoint holds one)")
    g.add_argument("--t5xxl_max_token_length", type=int, default=DEFAULT_T5_MAX_LENGTH, help="T5 tokens (256)")
    g.add_argument("--apply_lg_attn_mask", action="store_true", help="mask CLIP-L/G padding inside the encoders")
    g.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding inside the encoder")
    g.add_argument("--clip_l_dropout_rate", type=float, default=0.0, help="per-sample dropout of CLIP-L's output")
    g.add_argument("--clip_g_dropout_rate", type=float, default=0.0, help="per-sample dropout of CLIP-G's output")
    g.add_argument("--t5_dropout_rate", type=float, default=0.0, help="per-sample dropout of T5-XXL's output")
    g.add_argument("--clip_l_tokenizer", type=str, default=None, help="folder with another CLIP-L tokenizer")
    g.add_argument("--clip_g_tokenizer", type=str, default=None, help="folder with another CLIP-G tokenizer")
    g.add_argument("--t5xxl_tokenizer", type=str, default=None, help="folder with another T5 tokenizer")
    g = parser.add_argument_group("SD3 timesteps and positions")
    g.add_argument("--training_shift", type=float, default=1.0,
                   help="shift of the sampled timesteps: s u / (1 + (s - 1) u) (the SD3 paper uses 3.0)")  # fmt: skip
    g.add_argument("--pos_emb_random_crop_rate", type=float, default=0.0,
                   help="probability of a random crop of the position table per batch (SD3.5)")  # fmt: skip
    g.add_argument("--enable_scaled_pos_embed", action="store_true",
                   help="position tables scaled to each dataset resolution (SD3.5 Medium)")  # fmt: skip


class SD3Spec:
    """SD3 Medium, SD3.5 Medium, SD3.5 Large (and Large Turbo) for the training recipes."""

    name = "SD3"
    network_module = "networks.lora_sd3"

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        add_sd3_model_args(parser)
        add_unsupported_args(parser, SD3_UNSUPPORTED)

    def check_args(self, args: argparse.Namespace) -> None:
        if not args.pretrained_model_name_or_path:
            raise UserError(f"{CHECKPOINT_OPTION} is required (the SD3/SD3.5 checkpoint)")
        if args.t5xxl_max_token_length < 1:
            raise UserError(f"--t5xxl_max_token_length must be at least 1, got {args.t5xxl_max_token_length}")
        if not 0.0 <= args.pos_emb_random_crop_rate <= 1.0:
            raise UserError(f"--pos_emb_random_crop_rate must be between 0 and 1, got {args.pos_emb_random_crop_rate}")
        if not args.training_shift > 0:
            raise UserError(f"--training_shift must be > 0, got {args.training_shift}")
        SD3TextDropoutRates(args.clip_l_dropout_rate, args.clip_g_dropout_rate, args.t5_dropout_rate)
        if args.fp8_base_unet:
            args.fp8_base = True  # as upstream's SD3 scripts

    def objective(self, args: argparse.Namespace) -> ObjectiveConfig:
        """Upstream's SD3 objective: u from the --weighting_scheme density shifted by --training_shift (continuous
        here), and the x0-space loss (its preconditioning) with the scheme's loss weights."""
        return objective_config(args, timestep_sampling="density_shift", discrete_flow_shift=args.training_shift,
                                model_prediction_type="sigma_scaled")  # fmt: skip

    def metadata(self, args: argparse.Namespace) -> dict[str, object]:
        return {"ss_training_shift": args.training_shift, "ss_clip_l_dropout_rate": args.clip_l_dropout_rate,
                "ss_clip_g_dropout_rate": args.clip_g_dropout_rate, "ss_t5_dropout_rate": args.t5_dropout_rate,
                "ss_enable_scaled_pos_embed": args.enable_scaled_pos_embed,
                "ss_pos_emb_random_crop_rate": args.pos_emb_random_crop_rate}  # fmt: skip

    def add_finetune_args(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("SD3 text encoders in full fine-tuning")
        g.add_argument("--train_text_encoder", action="store_true", help="also train CLIP-L and CLIP-G")
        g.add_argument("--train_t5xxl", action="store_true", help="also train T5-XXL (with --train_text_encoder)")
        for index, name in enumerate(("CLIP-L", "CLIP-G", "T5-XXL"), 1):
            g.add_argument(f"--learning_rate_te{index}", f"--text_encoder_lr{index}", dest=f"learning_rate_te{index}",
                           type=float, default=None, help=f"{name}'s learning rate (default --learning_rate; 0: frozen)")  # fmt: skip
        g.add_argument("--use_t5xxl_cache_only", action="store_true",
                       help="cache the text outputs but use only T5-XXL's; CLIP runs (and trains) live")  # fmt: skip

    def finetune_text_encoders(self, args: argparse.Namespace) -> dict[int, float]:
        """--train_text_encoder trains CLIP-L and CLIP-G, --train_t5xxl also T5-XXL, each at its
        --learning_rate_te<N> (default --learning_rate); a learning rate of 0 keeps that encoder frozen, as upstream."""
        if args.use_t5xxl_cache_only:  # as upstream: it turns the caching on; CLIP's cached part is not used
            args.cache_text_encoder_outputs = True
        if args.train_t5xxl and not args.train_text_encoder:
            raise UserError("--train_t5xxl needs --train_text_encoder")
        if not args.train_text_encoder:
            return {}
        lrs = [args.learning_rate if lr is None else lr
               for lr in (args.learning_rate_te1, args.learning_rate_te2, args.learning_rate_te3)]  # fmt: skip
        trained = {i: lr for i, lr in enumerate(lrs[:2]) if lr}
        if args.train_t5xxl and lrs[2]:
            if args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk or args.use_t5xxl_cache_only:
                raise UserError("--train_t5xxl cannot train T5-XXL from cached outputs: remove the text-encoder caching")
            trained[2] = lrs[2]
        return trained

    def load(self, args: argparse.Namespace, options: LoadOptions) -> SD3Family:
        return load_sd3_family(args, options)

    def make_controlnet(self, args: argparse.Namespace, family: SD3Family, *, trained: bool) -> nn.Module:
        raise UserError("ControlNet training is for FLUX.1 here (flux_train_control_net.py); SD3 has none yet")

    def memory_architecture(self, args: argparse.Namespace) -> Architecture:
        return read_architecture("sd3", args.pretrained_model_name_or_path, clip_l=args.clip_l, clip_g=args.clip_g,
                                 t5xxl=args.t5xxl, vae=args.vae)  # fmt: skip

    def load_latent_codec(self, args: argparse.Namespace, options: LoadOptions) -> AutoEncoderLatentCodec:
        self.check_args(args)
        files = sd3_files(args)
        vae = load_sd3_vae(files.vae.path, dtype=options.dtype, device=options.device, option=files.vae.option)
        return sd3_latent_codec(vae, options.latent_samples)

    def load_text_codec(self, args: argparse.Namespace, options: LoadOptions) -> SD3TextCodec:
        self.check_args(args)
        text = load_sd3_text_encoder(sd3_files(args), sd3_text_settings(args), dtype=options.dtype,
                                     device=options.device)  # fmt: skip
        return SD3TextCodec(text)


SD3 = SD3Spec()
