"""Peak RAM of networks/flux_merge_lora.py merging a LoRA into a ~2 GB FLUX.1 checkpoint, as a ratio to the file.

A FLUX-shaped bf16 checkpoint (hidden 3072, 2 double + 2 single blocks; real layer sizes) and a rank-16 LoRA on
every block layer are written once, by a child process; each case runs the merge tool's command line in a child
process and reads that child's peak RSS (``ru_maxrss`` from ``os.wait4``): everything the process held, interpreter
and imports included. This process imports no torch, so a child's peak never starts from a large parent's pages.
The imports alone are measured the same way, for reference. Target: peak RSS <= 1.3 x the checkpoint's size.

    .venv/bin/python bench/bench_merge_memory.py            # files in /tmp/merge-bench (about 6 GB of disk)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "networks" / "flux_merge_lora.py"
CASES = {"merge, output in the file's bf16": [], "merge, --save_precision fp8": ["--save_precision", "fp8"]}


def make_files(folder: Path) -> None:
    """The ~2 GB bf16 checkpoint (tensor by tensor) and a rank-16 LoRA on every block layer."""
    import torch

    from library.io.safetensors_stream import PendingTensor, mem_eff_save_file
    from library.models.flux.model import Flux
    from library.models.flux.tiny import tiny_flux_params
    from networks import lora_flux

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, lora = files(folder)
    params = tiny_flux_params(hidden_size=3072, depth=2, depth_single_blocks=2, vec_in_dim=768, context_in_dim=4096)
    with torch.device("meta"):
        model = Flux(params)
    if not checkpoint.exists():
        generator = torch.Generator().manual_seed(0)

        def random(shape: tuple[int, ...]) -> torch.Tensor:
            return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

        items = {k: PendingTensor(tuple(v.shape), torch.bfloat16, lambda s=tuple(v.shape): random(s))
                 for k, v in model.state_dict().items()}  # fmt: skip
        mem_eff_save_file(items, checkpoint, {"format": "pt"})
    if not lora.exists():
        network = lora_flux.create_network(1.0, 16, 8.0, None, None, model)
        with torch.no_grad():
            for param in network.parameters():
                param.normal_(0, 0.01)
        network.save_weights(lora, torch.bfloat16, {"ss_network_module": "networks.lora_flux"})


def files(folder: Path) -> tuple[Path, Path]:
    return folder / "flux-2gb-bf16.safetensors", folder / "lora-r16.safetensors"


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak RSS of the child in MiB, seconds); the command must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/merge-bench")
    parser.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        make_files(Path(args.folder))
        return
    subprocess.run([sys.executable, __file__, "--make", "--folder", args.folder], check=True)
    checkpoint, lora = files(Path(args.folder))
    size_mb = checkpoint.stat().st_size / 2**20
    out = Path(args.folder) / "merged.safetensors"
    imports, _ = peak_rss_mb([sys.executable, "-c", "import networks.lora_tools.cli"])
    print(f"checkpoint {checkpoint} ({size_mb:.0f} MiB bf16), LoRA {lora} ({lora.stat().st_size / 2**20:.0f} MiB)")
    print(f"{'case':42s} {'peak RSS MiB':>12s} {'x file':>7s} {'above imports':>13s} {'s':>6s}")
    print(f"{'imports only (python -c import ...)':42s} {imports:12.0f} {imports / size_mb:7.2f}")
    for name, extra in CASES.items():
        command = [sys.executable, str(SCRIPT), "--flux_model", str(checkpoint), "--save_to", str(out),
                   "--models", str(lora), "--ratios", "0.8", "--overwrite", *extra]  # fmt: skip
        peak, seconds = peak_rss_mb(command)
        print(f"{name:42s} {peak:12.0f} {peak / size_mb:7.2f} {(peak - imports) / size_mb:13.2f} {seconds:6.1f}")
        print(f"    {' '.join(command)}")
        out.unlink()


if __name__ == "__main__":
    main()
