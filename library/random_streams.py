"""Random streams keyed by what they are for (a training sample, an image being cached), so that a draw does not
depend on which process makes it or on what was drawn before: N processes give the same numbers as one."""

from __future__ import annotations

import hashlib

import torch


def keyed_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (e.g. the run's seed and a sample's epoch, batch and position)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def keyed_normal(shape: tuple[int, ...], keys: list[tuple]) -> torch.Tensor:
    """[len(keys), *shape] standard normal float32 samples, row i from ``keys[i]``'s stream."""
    return torch.stack([torch.randn(shape, generator=keyed_generator(*key)) for key in keys])
