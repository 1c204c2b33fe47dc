"""Metadata written into trained files, as upstream writes it: ``ss_*`` training keys, ``modelspec.*``
(SAI model spec 1.0.1) and the additional-networks hashes. Secrets never enter it."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
from collections.abc import Mapping

import safetensors.torch
import torch

MODELSPEC_VERSION = "1.0.1"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"


def modelspec_architecture(family: str, variant: str, target: str) -> str:
    """e.g. ("flux", "dev", "lora") -> "flux-1-dev/lora"; full checkpoints have no suffix."""
    base = {"flux": f"flux-1-{variant}"}.get(family, f"{family}-{variant}")
    return f"{base}/{target}" if target in ("lora", "textual-inversion") else base


def modelspec_metadata(
    *,
    architecture: str,
    implementation: str,
    title: str,
    resolution: tuple[int, int],
    timestamp: float,
    extra: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    values = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
    }
    for key, value in (extra or {}).items():
        if value:
            values[f"modelspec.{key}"] = str(value)
    return values


def stringify(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors metadata values must be strings: dicts and lists as JSON, None dropped."""
    out = {}
    for key, value in metadata.items():
        if value is None:
            continue
        out[key] = (
            value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        )
    return out


def additional_network_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-webui-additional-networks computes them over the file
    holding only the ``ss_*`` metadata: sha256 of the tensor data, and sha256 of 64 KiB at 1 MiB (8 chars)."""
    training_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, training_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    stream = io.BytesIO(data)
    stream.seek(0x100000)
    legacy_hash = hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash
