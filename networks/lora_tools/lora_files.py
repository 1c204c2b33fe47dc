"""LoRA files in and out for the tools: reading sd-scripts or diffusers/PEFT LoRAs of one family into
(down, up, alpha) per module, and writing LoRAs and (streamed, tensor by tensor) checkpoints."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from library.errors import UserError
from library.io.safetensors_file import atomic_save_file, read_header
from library.io.safetensors_stream import PendingTensor, mem_eff_save_file
from library.models.checkpoint_kind import describe_checkpoint
from library.training.metadata import additional_network_hashes
from networks.convert_lora_common import sd_scripts_modules
from networks.lora_tools.families import ToolFamily

logger = logging.getLogger(__name__)

LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoRAWeights:
    """One module of a LoRA: ``delta = alpha / rank * up @ down`` (Linear or Conv2d shapes)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight it changes."""
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass(frozen=True)
class LoRAFile:
    """A LoRA given to a tool, with the ratio it is merged at."""

    path: Path
    ratio: float
    modules: dict[str, LoRAWeights]
    metadata: dict[str, str]
    stored_dtype: torch.dtype = torch.float32  # the file's own dtype (the merged LoRA's default)

    @property
    def label(self) -> str:
        return f"--models {self.path}"

    @property
    def title(self) -> str:
        """upstream's merged_from entry: the file's modelspec.title, else its name without suffix."""
        return self.metadata.get("modelspec.title") or self.path.stem

    def summary(self) -> dict[str, object]:
        """What ``ss_merged_loras`` records of this part."""
        ranks = sorted({w.rank for w in self.modules.values()})
        alphas = sorted({w.alpha for w in self.modules.values()})
        return {"file": self.path.name, "title": self.title, "ratio": self.ratio, "modules": len(self.modules),
                "dim": ranks[0] if len(ranks) == 1 else "Dynamic",
                "alpha": alphas[0] if len(alphas) == 1 else "Dynamic",
                "sshs_model_hash": self.metadata.get("sshs_model_hash")}  # fmt: skip


def is_peft(keys: list[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def read_lora(family: ToolFamily, path: str | os.PathLike, ratio: float, dtype: torch.dtype) -> LoRAFile:
    """A LoRA of ``family`` in sd-scripts keys or diffusers/PEFT keys (recognised by their names), its tensors in
    ``dtype``; UserError for a missing, truncated or wrong file, or one whose metadata names the other family."""
    path = Path(path)
    source = f"--models {path}"
    header = read_header(path, "--models")
    kind = describe_checkpoint(header)
    if kind != "LoRA":
        raise UserError(f"{source}: expected a LoRA, found {kind}")
    _check_metadata(family, header.metadata, source)
    state = load_file(os.fspath(path))
    if is_peft(list(state)):
        state = family.from_peft(state, header.metadata, source)
    modules, stored = {}, torch.float32
    for name, (down, up, alpha) in sd_scripts_modules(state, source).items():
        rank, stored = down.shape[0], down.dtype
        modules[name] = LoRAWeights(down.to(dtype), up.to(dtype), float(alpha) if alpha else float(rank))
    return LoRAFile(path, ratio, modules, dict(header.metadata), stored)


def _check_metadata(family: ToolFamily, metadata: Mapping[str, str], source: str) -> None:
    other = family.peft.other_family
    said = [metadata.get(k, "") for k in ("ss_network_module", "modelspec.architecture")]
    said = [value for value in said if any(m in value for m in other.metadata_markers)]
    if said:
        raise UserError(f"{source}: not {family.peft.article} {family.title} LoRA: its metadata says "
                        f"{' / '.join(said)} ({other.hint} use {family.other_merge_tool})")  # fmt: skip


def check_family(family: ToolFamily, lora: LoRAFile) -> None:
    """A LoRA whose module names belong to the other family is refused, naming the tool for it."""
    prefixes = (family.arch.unet_prefix, *family.arch.text_encoder_prefixes)
    foreign = sorted(n for n in lora.modules if not n.startswith(tuple(p + "_" for p in prefixes)))
    hint = family.other_family_hint(sorted(lora.modules))
    if foreign or hint:
        names = ", ".join((foreign or sorted(lora.modules))[:3])
        raise UserError(f"{lora.label}: not {family.peft.article} {family.title} LoRA ({names}){hint}")


def save_lora(path: Path, tensors: dict[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a LoRA with the sd-webui-additional-networks hashes in its metadata."""
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_network_hashes(tensors, metadata)
    atomic_save_file(tensors, path, metadata)


def save_checkpoint(path: Path, items: dict[str, PendingTensor], metadata: Mapping[str, str]) -> None:
    """Write tensors made one at a time, each streamed to disk before the next is made (atomic)."""
    mem_eff_save_file(items, path, metadata)
