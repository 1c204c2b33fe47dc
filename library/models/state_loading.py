"""Shared steps of loading a model from a checkpoint: compare key sets and shapes, then assign the tensors
into a model built on the meta device (so RAM holds the weights once). Never a silent non-strict load."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from library.errors import UserError


def describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} keys: {shown}{', ...' if len(keys) > limit else ''}"


def check_state_keys(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str, kind: str
) -> None:
    """UserError naming missing, unexpected and wrongly shaped keys of a ``kind`` checkpoint."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in set(found) & set(expected)
                   if tuple(found[k]) != tuple(expected[k]))  # fmt: skip
    problems = []
    if missing:
        problems.append(f"missing {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {describe_keys(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {describe_keys(wrong, 3)}")
    if problems:
        raise UserError(f"{what}: not a complete {kind} checkpoint: {'; '.join(problems)}")


def assign_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict assign-load, then give meta-device non-persistent buffers (CLIP's position_ids) real values."""
    model.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise RuntimeError(f"buffer {name} has no value after loading")
        owner = model.get_submodule(name.rpartition(".")[0])
        owner.register_buffer(
            "position_ids", torch.arange(buffer.shape[-1], device=device).expand(1, -1), persistent=False
        )
