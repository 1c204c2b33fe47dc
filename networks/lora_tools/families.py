"""FLUX.1 and SD3/SD3.5 as the LoRA tools see them: target lists, files, option names, metadata strings."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from library.models.flux import model as flux_model
from library.models.layouts import CheckpointFile, open_flux_file, open_sd3_file
from library.models.sd3 import model as sd3_model
from networks.convert_flux_lora import FLUX_LAYOUT
from networks.convert_lora_common import LoraLayout
from networks.convert_sd3_lora import SD3_LAYOUT
from networks.lora_flux import FLUX_LORA
from networks.lora_sd3 import SD3_LORA
from networks.lora_targets import LoRAArchitecture


@dataclass(frozen=True)
class ToolFamily:
    """One model family for the extract and merge tools."""

    title: str  # "FLUX.1"
    arch: LoRAArchitecture  # its LoRA targets and names (networks/lora_flux.py, lora_sd3.py)
    encoders: tuple[str, ...]  # text-encoder names in the order of ``arch.text_encoders``
    model_option: str  # the merge tool's checkpoint option
    open_model: Callable[[str | os.PathLike, str], CheckpointFile]
    peft: LoraLayout  # its LoRA names in diffusers/PEFT form (--diffusers)
    merge_tool: str
    other_merge_tool: str  # the other family's merge tool, named when its LoRA is given here
    base_model_version: Callable[[object], str]  # ss_base_model_version of a denoiser's params
    architecture: Callable[[object], str]  # modelspec.architecture of a denoiser's params
    default_architecture: str  # when no checkpoint or LoRA metadata says
    implementation: str
    lora_implementation: str
    prediction_type: str | None

    @property
    def network_module(self) -> str:
        return self.arch.module

    def encoder_prefix(self, name: str) -> str:
        return self.arch.text_encoders[self.encoders.index(name)].prefix

    def encoder_of_prefix(self, prefix: str) -> str | None:
        return next((n for n, slot in zip(self.encoders, self.arch.text_encoders) if slot.prefix == prefix), None)

    def from_peft(self, state: Mapping[str, Tensor], metadata: Mapping[str, str], source: str) -> dict[str, Tensor]:
        """sd-scripts keys for a diffusers/PEFT LoRA of this family (--diffusers)."""
        return self.peft.to_sd_scripts(state, metadata, source)

    def other_family_hint(self, names: list[str]) -> str:
        other = self.peft.other_family
        if any(m in n for n in names for m in other.name_markers):
            return f" ({other.hint} use {self.other_merge_tool})"
        return ""


FLUX = ToolFamily(
    title="FLUX.1",
    arch=FLUX_LORA,
    encoders=("clip_l", "t5xxl"),
    model_option="--flux_model",
    open_model=open_flux_file,
    peft=FLUX_LAYOUT,
    merge_tool="networks/flux_merge_lora.py",
    other_merge_tool="networks/sd3_merge_lora.py",
    base_model_version=lambda params: "flux1",
    architecture=lambda params: f"flux-1-{params.variant}",
    default_architecture="flux-1-dev",
    implementation=flux_model.MODELSPEC_IMPLEMENTATION,
    lora_implementation=flux_model.MODELSPEC_IMPLEMENTATION,
    prediction_type=None,
)

SD3 = ToolFamily(
    title="SD3/SD3.5",
    arch=SD3_LORA,
    encoders=("clip_l", "clip_g", "t5xxl"),
    model_option="--sd3_model",
    open_model=open_sd3_file,
    peft=SD3_LAYOUT,
    merge_tool="networks/sd3_merge_lora.py",
    other_merge_tool="networks/flux_merge_lora.py",
    base_model_version=lambda params: params.variant,
    architecture=lambda params: params.modelspec_architecture,
    default_architecture="stable-diffusion-3-medium",
    implementation=sd3_model.MODELSPEC_IMPLEMENTATION,
    lora_implementation=sd3_model.MODELSPEC_LORA_IMPLEMENTATION,
    prediction_type="epsilon",
)
