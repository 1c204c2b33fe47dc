"""Two processes against one on the CPU, same global batch: the step time of flux_train_network.py (a LoRA on the
tiny FLUX.1 models, cached latents and text) with 2 processes x batch b against 1 process x batch 2b, and the share
of the 2-process step that the gradient all-reduce takes (gloo, the LoRA's parameter count, measured alone).

Each configuration runs the real command line twice (--warmup steps, then --warmup + --steps) and the step time is
the difference divided by --steps, so start-up and model loading cancel out. Both use all cores: one process with
--threads, two processes with --threads / 2 each.

    .venv/bin/python bench/bench_multi_process.py [--steps 30] [--batch 1] [--threads 2] [--width 512] [--resolution 128]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(root: Path, batch: int, resolution: int) -> Path:
    from PIL import Image

    images = root / "images"
    if not images.exists():
        images.mkdir(parents=True)
        for i in range(16):
            Image.new("RGB", (resolution, resolution), (16 * i, 255 - 16 * i, 128)).save(images / f"{i:02d}.png")
            (images / f"{i:02d}.txt").write_text(f"a square of colour {i}", encoding="utf-8")
    config = root / f"batch{batch}.toml"
    config.write_text(f"[general]\ncaption_extension = '.txt'\n[[datasets]]\nresolution = {resolution}\nbatch_size = {batch}\n"
                      f"[[datasets.subsets]]\nimage_dir = '{images}'\nnum_repeats = 8\n", encoding="utf-8")  # fmt: skip
    return config


def _train(models: dict, config: Path, out: Path, steps: int, processes: int, threads: int) -> tuple[float, str]:
    args = ["--pretrained_model_name_or_path", str(models["flux_dev"]), "--clip_l", str(models["clip_l"]),
            "--t5xxl", str(models["t5xxl"]), "--ae", str(models["ae"]), "--dataset_config", str(config),
            "--output_dir", str(out), "--network_module", "networks.lora_flux", "--network_dim", "16",
            "--network_train_unet_only", "--learning_rate", "1e-4", "--max_train_steps", str(steps), "--seed", "1",
            "--t5xxl_max_token_length", "16", "--cache_latents", "--cache_text_encoder_outputs",
            "--max_data_loader_n_workers", "0"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_port()), str(REPO / "flux_train_network.py"), *args]  # fmt: skip
    else:
        command = [sys.executable, str(REPO / "flux_train_network.py"), *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return elapsed, result.stderr


def _allreduce_worker(numel: int, repeats: int) -> None:
    """Run under torchrun: the median time of one all-reduce of ``numel`` float32 values (gloo)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    buffer = torch.randn(numel)
    times = []
    for i in range(repeats + 3):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        if i >= 3:
            times.append(time.perf_counter() - start)
    if dist.get_rank() == 0:
        print(f"ALLREDUCE {statistics.median(times)}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (beyond the warm-up run)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=512, help="FLUX hidden size (2 double + 4 single blocks)")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="batch size per process with 2 processes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    parser.add_argument("--allreduce", type=int, default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.allreduce is not None:
        _allreduce_worker(args.allreduce, 20)
        return

    from tools.make_tiny_models import make_tiny_flux_set

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = make_tiny_flux_set(root / "models", hidden_size=args.width, depth_single_blocks=4)
        step: dict[int, float] = {}
        params = 0
        for processes, batch in ((1, 2 * args.batch), (2, args.batch)):
            config = _dataset(root, batch, args.resolution)
            threads = max(1, args.threads // processes)
            short, _ = _train(models, config, root / f"short{processes}", args.warmup, processes, threads)
            long, log = _train(models, config, root / f"long{processes}", args.warmup + args.steps, processes, threads)
            step[processes] = (long - short) / args.steps
            params = int(re.search(r"\((\d+) trainable parameters\)", log).group(1))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", __file__, "--allreduce", str(params)], capture_output=True, text=True,
                                env=env)  # fmt: skip
        match = re.search(r"ALLREDUCE ([\d.e-]+)", result.stdout)
        if match is None:
            raise SystemExit(result.stderr[-3000:])
        allreduce = float(match.group(1))
    print(f"FLUX width {args.width}, 2+4 blocks, {args.resolution}px, global batch {2 * args.batch}, {params} trained "
          f"parameters (LoRA rank 16), {args.threads} CPU threads in all, {args.steps} timed steps")
    print(f"step, 1 process x batch {2 * args.batch}: {step[1] * 1000:.1f} ms")
    print(f"step, 2 processes x batch {args.batch}: {step[2] * 1000:.1f} ms")
    print(f"ratio 2 processes / 1 process: {step[2] / step[1]:.3f}")
    print(f"gradient all-reduce alone: {allreduce * 1000:.2f} ms = {allreduce / step[2]:.3f} of the 2-process step")


if __name__ == "__main__":
    main()
