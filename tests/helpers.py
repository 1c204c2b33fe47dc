"""Helpers for tests that run the repository's scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a repository script the way users do: a fresh Python process, real argv."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    if "PYTEST_XDIST_WORKER" in os.environ:  # the xdist workers share the cores: one thread per script run
        env.setdefault("OMP_NUM_THREADS", "1")
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


def write_images(folder: Path, sizes: list[tuple[int, int]], captions: list[str | None] | None = None,
                 ext: str = ".txt", mode: str = "RGB") -> list[Path]:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        rng = np.random.default_rng(i)
        channels = 4 if mode == "RGBA" else 3
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(pixels, mode).save(path)
        caption = (captions or [f"caption {i}"] * len(sizes))[i]
        if caption is not None:
            path.with_suffix(ext).write_text(caption, encoding="utf-8")
        paths.append(path)
    return paths


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


QUICK_START_INSTALL = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "


def readme_quick_start_commands() -> list[str]:
    """The README's quick-start commands, as written there: [set up and train, run the tests]."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]
