"""Load time and peak RAM of FLUX.1 checkpoints (~2 GB BFL layout, bf16 and fp8) against the file size.

Each case runs in a fresh process and reads every page of the loaded weights (as a first forward would);
peak RSS (VmHWM) is measured above the process's RSS after imports. The reference
in the same run is safetensors' own `load_file` of the same file (the least any loader must do).

    .venv/bin/python bench/bench_flux_load.py            # writes the checkpoints to /tmp/flux-bench once
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = {
    "safetensors_load_file (reference)": ("bf16", "load_file"),
    "ours bf16 file -> bf16": ("bf16", "bf16"),
    "ours bf16 file -> fp8 linear": ("bf16", "fp8"),
    "safetensors_load_file fp8 (reference)": ("fp8", "load_file"),
    "ours fp8 file -> fp8 linear": ("fp8", "fp8"),
    "ours fp8 file -> bf16": ("fp8", "bf16"),
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _touch(tensors) -> int:
    """Read one byte per page of every tensor, so mmap-backed weights are really in memory (as after a forward)."""
    total = 0
    for t in tensors:
        flat = t.detach().reshape(-1).view(torch.uint8)
        total += int(flat[::4096].sum())
    return total


def run_case(path: str, mode: str) -> dict:
    from safetensors.torch import load_file

    from library.models.flux.loading import load_flux_model

    base = _status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "load_file":
        tensors = list(load_file(path).values())
    else:
        tensors = list(load_flux_model(path, dtype=torch.bfloat16, fp8_linear=mode == "fp8").parameters())
    _touch(tensors)
    seconds = time.perf_counter() - start
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)
    peak = _status_mb("VmHWM")
    return {"seconds": seconds, "peak_above_base_mb": peak - base, "weights_mb": n_bytes / 2**20}


def make_checkpoints(folder: Path) -> dict[str, Path]:
    from library.io.safetensors_file import atomic_save_file
    from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"bf16": folder / "flux-bench-bf16.safetensors", "fp8": folder / "flux-bench-fp8.safetensors"}
    if all(p.exists() for p in paths.values()):
        return paths
    params = tiny_flux_params(hidden_size=3072, depth=2, depth_single_blocks=2, vec_in_dim=768, context_in_dim=4096)
    state = make_flux_state_dict(params, seed=0, dtype=torch.bfloat16)
    atomic_save_file(state, paths["bf16"])
    fp8 = {
        k: v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.startswith(("double", "single")) else v
        for k, v in state.items()
    }
    atomic_save_file(fp8, paths["fp8"])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folder", default="/tmp/flux-bench")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    paths = make_checkpoints(Path(args.folder))
    print(f"{'case':40s} {'file MB':>8s} {'load s':>7s} {'peak RSS MB':>12s} {'peak/file':>9s} {'weights MB':>10s}")
    for name, (file_kind, mode) in CASES.items():
        path = paths[file_kind]
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # same warm page cache for all
        out = (
            subprocess.run(
                [sys.executable, __file__, "--case", str(path), mode], capture_output=True, text=True, check=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        r = json.loads(out)
        size = os.path.getsize(path) / 2**20
        print(
            f"{name:40s} {size:8.0f} {r['seconds']:7.2f} {r['peak_above_base_mb']:12.0f} "
            f"{r['peak_above_base_mb'] / size:9.2f} {r['weights_mb']:10.0f}"
        )


if __name__ == "__main__":
    main()
