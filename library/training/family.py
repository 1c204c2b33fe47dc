"""The model family as a declared plug: everything the recipes and the loop use of a model family.

A family (``library/training/families/``) is given to a recipe as a :class:`FamilySpec`: its command-line
options, the checks on them, its objective, and how it loads. Loading gives a :class:`ModelFamily`: the loaded
models and everything model-specific the training loop needs (latents, text, prediction, sample images,
metadata). Recipes and the loop only ever see these two protocols.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from library.data.encode_caches import LatentEncoder, TextEncoderOutputs
from library.memory.block_swap import BlockSwap
from library.memory.estimate_models import Architecture
from library.training.objective import ObjectiveConfig
from library.training.sample_prompts import SamplePrompt


@dataclass
class ModelInput:
    """What the denoiser is given for one batch: noisy latents [B, C, H, W] (model space), times ``t`` [B] in
    [0, 1] (1 is pure noise), the text conditioning (cached or encoded now), and an optional control hint
    (images [B, 3, H*8, W*8] in [-1, 1] for a ControlNet). Loss masks are not an input: the loop keeps them.
    ``augment`` allows the family's training-time input augmentations (e.g. random position crops); validation
    and prior predictions turn it off."""

    noisy_latents: Tensor
    timesteps: Tensor
    text: dict[str, Tensor]
    control: Tensor | None = None
    augment: bool = True


@dataclass(frozen=True)
class LoadOptions:
    """How a recipe wants the family's models: compute dtype, device, and the memory features."""

    dtype: torch.dtype
    device: torch.device
    fp8_base: bool = False
    blocks_to_swap: int = 0  # --blocks_to_swap: the denoiser's last blocks stream from host memory
    denoiser_dtype: torch.dtype | None = None  # the trained denoiser's dtype when it differs (full fine-tuning)
    text_encoder_dtype: torch.dtype | None = None  # the same for text encoders that train
    latent_samples: bool = True  # latents drawn from the VAE posterior (mean + sigma * eps), as upstream; else the mean
    resolutions: tuple[tuple[int, int], ...] = ()  # each dataset's (width, height), for resolution-aware families


class ModelFamily(Protocol):
    """The loaded models of one family and everything model-specific about training with them."""

    latent_codec: LatentEncoder  # images -> latents as the latent caches store them
    text_codec: TextEncoderOutputs  # captions -> text outputs as the text caches store them
    block_swaps: list[BlockSwap]  # --blocks_to_swap's swappers on the denoiser's blocks (empty without it)

    @property
    def denoiser(self) -> nn.Module:
        """The transformer that predicts the flow (what LoRA targets and checkpointing wrap)."""

    @property
    def blocks(self) -> list[nn.Module]:
        """The denoiser's repeated blocks, in execution order (gradient checkpointing and block swap attach here)."""

    @property
    def vae(self) -> nn.Module: ...

    @property
    def text_encoders(self) -> list[nn.Module | None]:
        """In the order the network modules name them (lora_te1, lora_te2/te3 ...); None where not loaded."""

    @property
    def text_encoder_names(self) -> list[str]:
        """Display names, in the order of ``text_encoders``."""

    @property
    def live_text_encoders(self) -> frozenset[int]:
        """Indices into ``text_encoders`` of the encoders that can run while the others' outputs come from the text
        cache (upstream's partial caching: a CLIP LoRA trains with cached T5 outputs)."""

    def describe(self) -> str:
        """One phrase for the start-up summary: the model and its variant."""

    def metadata(self) -> dict[str, object]:
        """The family's training metadata: ``ss_base_model_version`` and the family's own ``ss_*`` keys."""

    def modelspec_architecture(self, adapter: str | None) -> str:
        """``modelspec.architecture`` of a file trained on this family (adapter: "lora" or None)."""

    def modelspec_implementation(self, adapter: str | None) -> str: ...

    def modelspec_prediction_type(self) -> str | None:
        """``modelspec.prediction_type`` as upstream writes it for this family (None: not written)."""

    def offload_text_encoders(self) -> None:
        """Move the frozen text encoders off the accelerator (their outputs are cached)."""

    def to_model_latents(self, latents: Tensor) -> Tensor:
        """Latents as the codec encodes and the cache stores them -> the space the objective noises."""

    def encode_latents(self, images: Tensor, keys: list[tuple] | None = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> cache-space latents (batches that were not cached); ``keys`` name each
        image's posterior draw (see ``library/random_streams.py``)."""

    def encode_text(self, captions: list[str], cached: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Captions -> text outputs with the cache's keys; differentiable (text-encoder LoRA trains through it).
        With ``cached`` (the cache's outputs for these captions) only the ``live_text_encoders`` run and their
        parts replace the cached ones."""

    def augment_text(self, text: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-step training augmentation of text outputs, cached or not (e.g. per-encoder dropout); never for
        validation or samples. Identity where the family has none."""

    def image_seq_len(self, latents: Tensor) -> int:
        """Image tokens the denoiser sees for ``latents`` (resolution-dependent timestep shifts use it)."""

    def predict(self, inputs: ModelInput, dtype: torch.dtype) -> Tensor:
        """The velocity prediction [B, C, H, W] for ``inputs``, computed in ``dtype``."""

    def sample_image(self, prompt: SamplePrompt, seed: int, dtype: torch.dtype) -> Image.Image: ...

    def attach_controlnet(self, controlnet: nn.Module) -> None:
        """From now on ``predict`` runs ``controlnet`` on ``ModelInput.control`` and samples use their ``--cn``
        image (trained or frozen)."""

    def save_controlnet(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        """Write the attached ControlNet in the layout other tools load (atomic)."""

    def save_checkpoint(self, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                        mem_eff: bool) -> None:  # fmt: skip
        """Write the (fine-tuned) denoiser as the single file users load (atomic)."""

    def save_text_encoder(self, index: int, path: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                          mem_eff: bool) -> None:  # fmt: skip
        """Write a (fine-tuned) text encoder as the file users pass back with its option (atomic)."""

    @property
    def text_encoder_file_names(self) -> list[str]:
        """Suffixes of fine-tuned text-encoder files, upstream's ``<output>_<suffix>.safetensors``."""


class FamilySpec(Protocol):
    """A family as a recipe is given it: options, checks, objective and loading. ``args`` stops here: each method
    turns the namespace into the family's typed settings."""

    name: str  # the model family, for messages
    network_module: str  # the LoRA module users pass for this family (shown in errors)

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        """The family's model-file, text-encoder and objective options, and the upstream options it rejects."""

    def check_args(self, args: argparse.Namespace) -> None:
        """Required files and conflicting options, before anything is loaded (UserError)."""

    def objective(self, args: argparse.Namespace) -> ObjectiveConfig: ...

    def metadata(self, args: argparse.Namespace) -> dict[str, object]:
        """The ``ss_*`` keys upstream writes for the family's own options (its objective, text settings)."""

    def load(self, args: argparse.Namespace, options: LoadOptions) -> ModelFamily:
        """Load every model the recipe needs, frozen, onto ``options.device``."""

    def add_finetune_args(self, parser: argparse.ArgumentParser) -> None:
        """The family's own full fine-tuning options (e.g. which text encoders train)."""

    def finetune_text_encoders(self, args: argparse.Namespace) -> dict[int, float]:
        """Text encoders that full fine-tuning trains: index into ``text_encoders`` -> learning rate (not 0)."""

    def make_controlnet(self, args: argparse.Namespace, family: ModelFamily, *, trained: bool) -> nn.Module:
        """A ControlNet for ``family``'s denoiser: from --controlnet_model_name_or_path, or new (ControlNet
        training); UserError for a family without one."""

    def memory_architecture(self, args: argparse.Namespace) -> Architecture:
        """Every model's architecture read from its file's header (nothing loaded), for the memory pre-flight."""

    def load_latent_codec(self, args: argparse.Namespace, options: LoadOptions) -> LatentEncoder:
        """Only what encodes images (for tools/cache_latents.py)."""

    def load_text_codec(self, args: argparse.Namespace, options: LoadOptions) -> TextEncoderOutputs:
        """Only what encodes captions (for tools/cache_text_encoder_outputs.py)."""
