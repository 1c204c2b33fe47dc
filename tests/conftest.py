"""Shared fixtures: tiny checkpoints in the real single-file layouts, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# one thread per pytest-xdist worker (the workers share the cores), else up to two
XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
torch.set_num_threads(1 if XDIST_WORKER else max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of tiny FLUX.1 dev/schnell, AE, CLIP-L and T5 checkpoints, by role."""
    from tools.make_tiny_models import make_tiny_flux_set

    return make_tiny_flux_set(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tiny_sd3_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of the tiny SD3/SD3.5 checkpoints and text encoders, by role (see ``make_tiny_sd3_set``)."""
    from tools.make_tiny_models import make_tiny_sd3_set

    return make_tiny_sd3_set(tmp_path_factory.mktemp("tiny_sd3_models"))
