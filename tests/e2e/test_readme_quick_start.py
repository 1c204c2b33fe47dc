"""The README's quick start cannot drift: its first command runs here as written (without its install step, which
.ci/run does), and .ci/run runs its second command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image
from safetensors import safe_open

from tests.helpers import QUICK_START_INSTALL, REPO, readme_quick_start_commands


def test_two_commands_and_ci_runs_the_second():
    setup, tests = readme_quick_start_commands()
    assert setup.startswith(QUICK_START_INSTALL) and "\n" not in setup
    assert "pytest" in tests and "\n" not in tests
    assert "readme_quick_start_commands()[1]" in (REPO / ".ci" / "run").read_text()


def test_the_first_command_sets_up_trains_and_generates(tmp_path):
    setup, _ = readme_quick_start_commands()
    workspace = tmp_path / "clone"
    workspace.mkdir()
    for item in REPO.iterdir():  # a clone's files; examples/ is copied because training writes caches beside images
        if item.name in (".git", ".venv", "tiny_models", "out") or item.name.startswith("."):
            continue
        if item.name == "examples":
            shutil.copytree(item, workspace / item.name)
        else:
            (workspace / item.name).symlink_to(item)
    bin_dir = Path(sys.executable).parent  # the environment the install step would have made, activated
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(workspace))
    result = subprocess.run(["bash", "-c", setup[len(QUICK_START_INSTALL):]], cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lora = workspace / "out" / "lora" / "tiny-lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_flux" and any("lora_unet_" in k for k in f.keys())
    assert len(list((workspace / "out" / "lora" / "sample").glob("*.png"))) == 2  # one per epoch
    generated = list((workspace / "out").glob("*.png"))
    assert len(generated) == 1 and Image.open(generated[0]).size == (64, 64)
    assert "trainable parameters" in result.stderr and "steps" in result.stderr
    assert Path(workspace / "tiny_models" / "flux1-dev-tiny.safetensors").is_file()
