"""Where each model's tensors sit in a checkpoint file, whatever its layout: FLUX.1 in BFL layout (bare, or under
ComfyUI's ``model.diffusion_model.`` / ``model.`` prefix) or diffusers layout (fused q/k/v split into parts),
SD3/SD3.5 MMDiTs (bare or SAI's ``model.diffusion_model.``), and text encoders alone or bundled in a checkpoint
under ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``.

A ``ModelPart`` maps each state-dict key of one model (the BFL / SAI / transformers names) to a ``TensorRecipe``
over the file's tensors; the key tables themselves live with each loader (flux/diffusers_keys.py,
checkpoint_kind.py, text_encoders/). Tools read and rewrite a file through its parts without loading it whole.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import CLIPTextModel, T5EncoderModel

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, read_header
from library.io.tensor_source import TensorRecipe, TensorSource
from library.models.checkpoint_kind import describe_checkpoint, find_clip_layout, sd3_embedded_encoders
from library.models.flux.loading import open_flux_checkpoint
from library.models.flux.model import Flux
from library.models.sd3.loading import open_sd3_checkpoint
from library.models.sd3.model import MMDiT
from library.models.text_encoders.clip import PROJECTION, clip_config_from_header
from library.models.text_encoders.t5 import BIAS_KEY, Q_KEY, t5_config_from_header

DENOISER = "denoiser"
ENCODER_TITLES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL"}
ENCODER_KINDS = {"clip_l": "clip", "clip_g": "clip", "t5xxl": "t5"}


@dataclass
class ModelPart:
    """One model stored in a checkpoint: its state-dict keys and the file tensors each is made of."""

    name: str  # DENOISER or an encoder name ("clip_l", "clip_g", "t5xxl")
    description: str  # e.g. "FLUX.1 dev transformer (BFL ('model.diffusion_model.' prefix) layout)"
    recipes: dict[str, TensorRecipe]
    params: object  # FluxParams, SD3Params, CLIPTextConfig or T5Config
    build: Callable[[], nn.Module]  # the architecture on the meta device; its module paths are the state-dict keys


@dataclass
class CheckpointFile:
    """A checkpoint (one file, or a diffusers folder's shards) and the models found in it."""

    path: Path
    source: TensorSource
    parts: dict[str, ModelPart]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.source.headers[0].metadata)

    def keys(self) -> list[str]:
        return self.source.keys()

    def dtype(self, key: str) -> torch.dtype:
        return self.source.info(key).torch_dtype

    def read(self, recipe: TensorRecipe, device: str | torch.device = "cpu") -> Tensor:
        """Build one tensor, then let go of the file mappings, so reading a whole file never holds its pages."""
        try:
            return recipe.build(self.source, device)
        finally:
            self.source.close()

    def read_key(self, key: str, device: str | torch.device = "cpu") -> Tensor:
        return self.read(TensorRecipe((key,)), device)

    def describe(self) -> str:
        return ", ".join(part.description for part in self.parts.values())


def stored_rows(recipe: TensorRecipe, index: int, rows: Tensor, source: TensorSource) -> Tensor:
    """The rows of a model tensor (or of anything with its rows, such as a LoRA up weight) that the file stores as
    ``recipe.sources[index]``: the inverse of ``TensorRecipe.build`` along dim 0."""
    if recipe.combine == "cat":
        sizes = [source.info(k).shape[0] for k in recipe.sources]
        start = sum(sizes[:index])
        return rows[start : start + sizes[index]]
    if recipe.combine == "swap_halves":
        first, second = rows.chunk(2, dim=0)
        return torch.cat([second, first], dim=0)
    return rows


def _on_meta(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.device("meta"):
            return make()

    return build


def clip_part(header: SafetensorsHeader, outer: str, name: str, option: str) -> ModelPart:
    """A CLIP text encoder under ``outer``; its state-dict keys are CLIPTextModel's (``text_model.*``)."""
    layout = find_clip_layout(header, outer)
    if layout is None:
        where = f" under {outer!r}" if outer else ""
        raise UserError(f"{option} {header.path}{where}: expected a {ENCODER_TITLES.get(name, 'CLIP')} text encoder, "
                        f"found {describe_checkpoint(header)}")  # fmt: skip
    config = clip_config_from_header(header, layout, outer)
    build = _on_meta(lambda: CLIPTextModel(config))
    root = "text_model." if any(k.startswith("text_model.") for k in build().state_dict()) else ""
    recipes = {root + k[len(layout) :]: TensorRecipe((k,)) for k in header.keys()
               if k.startswith(layout) and k != outer + PROJECTION}  # fmt: skip
    if outer + PROJECTION in header:
        recipes[PROJECTION] = TensorRecipe((outer + PROJECTION,))
    title = ENCODER_TITLES.get(name, "CLIP")
    where = f"under {outer!r}" if outer else ("text_model.* keys" if layout else "bare keys")
    return ModelPart(name, f"{title} text encoder ({where})", recipes, config, build)


def t5_part(header: SafetensorsHeader, outer: str, name: str, option: str) -> ModelPart:
    """A T5 encoder under ``outer``; its state-dict keys are T5EncoderModel's (``encoder.block.*``)."""
    if outer + Q_KEY not in header or outer + BIAS_KEY not in header:
        where = f" under {outer!r}" if outer else ""
        raise UserError(f"{option} {header.path}{where}: expected a T5-XXL text encoder, found "
                        f"{describe_checkpoint(header)}")  # fmt: skip
    config = t5_config_from_header(header, outer)
    recipes = {k[len(outer) :]: TensorRecipe((k,)) for k in header.keys() if k.startswith(outer)}
    where = f"under {outer!r}" if outer else "bare keys"
    return ModelPart(name, f"T5-XXL text encoder ({where})", recipes, config, _on_meta(lambda: T5EncoderModel(config)))


def encoder_part(header: SafetensorsHeader, outer: str, name: str, option: str) -> ModelPart:
    make = t5_part if ENCODER_KINDS[name] == "t5" else clip_part
    return make(header, outer, name, option)


def _embedded_parts(header: SafetensorsHeader, option: str) -> dict[str, ModelPart]:
    return {name: encoder_part(header, outer, name, option) for name, outer in sd3_embedded_encoders(header).items()}


def open_flux_file(path: str | os.PathLike, option: str) -> CheckpointFile:
    """A FLUX.1 transformer in any layout the loader reads, with the text encoders a single file bundles."""
    checkpoint = open_flux_checkpoint(path, option)
    params = checkpoint.params
    denoiser = ModelPart(DENOISER, f"FLUX.1 {params.variant} transformer ({checkpoint.layout} layout)",
                         checkpoint.recipes, params, _on_meta(lambda: Flux(params)))  # fmt: skip
    parts = {DENOISER: denoiser}
    if len(checkpoint.source.headers) == 1:
        parts.update(_embedded_parts(checkpoint.source.headers[0], option))
    return CheckpointFile(Path(path), checkpoint.source, parts)


def open_sd3_file(path: str | os.PathLike, option: str) -> CheckpointFile:
    """An SD3/SD3.5 MMDiT (bare or under ``model.diffusion_model.``), with the text encoders the file bundles; the
    VAE and anything else in the file are kept as they are."""
    checkpoint = open_sd3_checkpoint(path, option)
    params, prefix = checkpoint.params, checkpoint.prefix
    recipes = {k[len(prefix) :]: TensorRecipe((k,)) for k in checkpoint.mmdit_keys()}
    denoiser = ModelPart(DENOISER, f"{params.display_name} MMDiT ({checkpoint.layout})", recipes, params,
                         _on_meta(lambda: MMDiT(params)))  # fmt: skip
    return CheckpointFile(Path(path), TensorSource([checkpoint.header]),
                          {DENOISER: denoiser, **_embedded_parts(checkpoint.header, option)})  # fmt: skip


def open_encoder_file(path: str | os.PathLike, name: str, option: str) -> CheckpointFile:
    """A text-encoder file (``clip_l``, ``clip_g`` or ``t5xxl``): bare keys, CLIP's ``text_model.*`` layout, or a
    checkpoint that bundles that encoder under ``text_encoders.<name>.transformer.``."""
    header = read_header(path, option)
    embedded = sd3_embedded_encoders(header)
    outer = embedded.get(name, "")
    return CheckpointFile(Path(path), TensorSource([header]), {name: encoder_part(header, outer, name, option)})
