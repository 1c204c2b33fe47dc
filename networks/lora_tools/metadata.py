"""Metadata the tools write: upstream's minimal ``ss_*`` LoRA keys and SAI model-spec keys, plus what each output
was made from (``ss_extracted_from``, ``ss_merged_loras``, ``modelspec.merged_from``)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from library.training.metadata import DEFAULT_MODELSPEC_RESOLUTION, modelspec_metadata
from networks.lora_tools.families import ToolFamily
from networks.lora_tools.lora_files import LoRAFile

FORMAT = {"format": "pt"}


def _modelspec(family: ToolFamily, architecture: str, lora: bool, title: str, merged_from: str | None = None,
               description: str | None = None) -> dict[str, str]:  # fmt: skip
    return modelspec_metadata(
        architecture=architecture + ("/lora" if lora else ""),
        implementation=family.lora_implementation if lora else family.implementation,
        title=title, resolution=DEFAULT_MODELSPEC_RESOLUTION, timestamp=time.time(),
        prediction_type=family.prediction_type,
        optional={"merged_from": merged_from, "description": description},
    )  # fmt: skip


def network_keys(family: ToolFamily, dims: Sequence[int], alphas: Sequence[float], base_model: str | None,
                 network_args: Mapping[str, object] | None = None) -> dict[str, str]:  # fmt: skip
    """upstream's minimal LoRA metadata; a dim or alpha that differs between modules is "Dynamic"."""
    dim = str(dims[0]) if len(set(dims)) == 1 else "Dynamic"
    alpha = str(float(alphas[0])) if len(set(alphas)) == 1 else "Dynamic"
    keys = {"ss_v2": "False", "ss_network_module": family.network_module, "ss_network_dim": dim,
            "ss_network_alpha": alpha, "ss_network_args": json.dumps(dict(network_args or {}))}  # fmt: skip
    if base_model is not None:
        keys["ss_base_model_version"] = base_model
    return {**FORMAT, **keys}


def extracted_lora_metadata(family: ToolFamily, params: object, save_to: Path, sources: Mapping[str, Path],
                            dims: Sequence[int], network_args: Mapping[str, object], clamp_quantile: float,
                            no_metadata: bool) -> dict[str, str]:  # fmt: skip
    """An extracted LoRA: the network keys (ss_network_dim = --dim), what it was extracted from, and (unless
    --no_metadata) the model spec."""
    alphas = [float(d) for d in dims]
    metadata = network_keys(family, dims, alphas, family.base_model_version(params), network_args)
    metadata["ss_extracted_from"] = json.dumps({**{option: path.name for option, path in sources.items()},
                                                "clamp_quantile": clamp_quantile})  # fmt: skip
    if not no_metadata:
        org, tuned = sources["model_org"].name, sources["model_tuned"].name
        description = f"LoRA extracted from the difference {tuned} - {org}"
        metadata.update(_modelspec(family, family.architecture(params), True, save_to.stem, description=description))
    return metadata


def merged_lora_metadata(family: ToolFamily, loras: Sequence[LoRAFile], dims: Sequence[int], save_to: Path,
                         no_metadata: bool) -> dict[str, str]:  # fmt: skip
    """LoRAs concatenated into one: alpha = rank everywhere, the parts recorded with their ratios."""
    base = next((lora.metadata["ss_base_model_version"] for lora in loras if "ss_base_model_version" in lora.metadata),
                None)  # fmt: skip
    metadata = network_keys(family, dims, dims, base)
    metadata["ss_merged_loras"] = json.dumps([lora.summary() for lora in loras])
    if not no_metadata:
        given = [lora.metadata.get("modelspec.architecture", "") for lora in loras]
        architecture = next((a.removesuffix("/lora") for a in given if a), family.default_architecture)
        merged_from = ", ".join(lora.title for lora in loras)
        metadata.update(_modelspec(family, architecture, True, save_to.stem, merged_from))
    return metadata


def merged_checkpoint_metadata(family: ToolFamily, source: Mapping[str, str], params: object | None, title: str,
                               loras: Sequence[LoRAFile], save_to: Path, no_metadata: bool) -> dict[str, str]:  # fmt: skip
    """A checkpoint with LoRAs merged in: its own metadata, the LoRAs and their ratios, and for a denoiser the model
    spec (architecture, title, merged_from as upstream)."""
    if no_metadata:
        return dict(FORMAT)
    metadata = {**FORMAT, **source, "ss_merged_loras": json.dumps([lora.summary() for lora in loras])}
    if params is not None:
        merged_from = ", ".join([title, *(lora.title for lora in loras)])
        metadata.update(_modelspec(family, family.architecture(params), False, save_to.stem, merged_from))
    return metadata
