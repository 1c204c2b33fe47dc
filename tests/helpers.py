"""Helpers for tests that run the repository's scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repository script the way users do: a fresh Python process, real argv."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=cwd or REPO, env=env,
        timeout=timeout,
    )  # fmt: skip


def flux_state_to_diffusers(state: dict, hidden: int) -> dict:
    """diffusers' own BFL->diffusers converter, with its hard-coded 3072 width patched to ``hidden``."""
    import diffusers.loaders.single_file_utils as sfu

    code = sfu.convert_flux_transformer_checkpoint_to_diffusers.__code__
    patched = code.replace(co_consts=tuple(hidden if c == 3072 else c for c in code.co_consts))
    convert = type(sfu.convert_flux_transformer_checkpoint_to_diffusers)(patched, sfu.__dict__)
    return convert(dict(state))
