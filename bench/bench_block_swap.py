"""Block swap cost: a LoRA training step (forward + backward, gradient checkpointing) and a sampling call (forward
only) through a stack of FLUX single blocks, with 0 and with N blocks swapped, run in turns in the same process.
On the CPU the "device" and the host are the same memory, so the figures are the swap machinery's own overhead
(hooks, schedule, copies between two RAM storages); ``--device cuda`` measures real transfers over the copy
stream, and the peak device memory of a training step.

    .venv/bin/python bench/bench_block_swap.py [--blocks 8] [--swap 4] [--width 512] [--tokens 256] [--steps 10]
        [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.memory.block_swap import BlockSwap, move_except_swapped  # noqa: E402
from library.memory.checkpointing import enable_block_checkpointing  # noqa: E402
from library.models.flux.layers import EmbedND, SingleStreamBlock  # noqa: E402
from library.models.flux.sampling import prepare_img_ids  # noqa: E402
from networks.lora import LoRAModule  # noqa: E402


class Stack(nn.Module):
    def __init__(self, blocks: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(SingleStreamBlock(width, width // 128) for _ in range(blocks))
        self.pe_embedder = EmbedND(128, 10_000, [16, 56, 56])

    def forward(self, x: torch.Tensor, vec: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        pe = self.pe_embedder(ids)
        for block in self.blocks:
            x = block(x, vec=vec, pe=pe)
        return x


def _setup(args: argparse.Namespace, num_swap: int):
    """A LoRA-wrapped, checkpointed stack with ``num_swap`` blocks swapped: (train step, sampling call, swapper)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Stack(args.blocks, args.width).requires_grad_(False)
    loras = [LoRAModule(f"lora_{i}_{name}", getattr(block, name), lora_dim=16, alpha=16.0)
             for i, block in enumerate(model.blocks) for name in ("linear1", "linear2")]  # fmt: skip
    for lora in loras:
        lora.apply_to()
        lora.to(device)
    enable_block_checkpointing(model.blocks)
    swap = BlockSwap(model.blocks, num_swap, device)
    swap.attach()
    move_except_swapped(model, device, [swap])
    side = 2 * int(args.tokens**0.5)
    ids = prepare_img_ids(1, side, side).to(device)
    x = torch.randn(1, ids.shape[1], args.width, device=device)
    vec = torch.randn(1, args.width, device=device)

    def train_step():
        swap.prepare_for_training()
        model(x, vec, ids).square().mean().backward()
        for lora in loras:
            lora.zero_grad(set_to_none=True)

    def sample_call():
        with swap.forward_only(), torch.no_grad():
            model(x, vec, ids)

    return train_step, sample_call, swap


def _interleaved(fns: list, steps: int, sync) -> list[float]:
    """Median time of each function, run in turns so that a busy machine slows them alike."""
    times = [[] for _ in fns]
    for step in range(steps + 1):
        for fn, recorded in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if step:  # the first round warms up
                recorded.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _peak_gib(args: argparse.Namespace, num_swap: int) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_step, _, swap = _setup(args, num_swap)
    train_step()
    torch.cuda.synchronize()
    swap.detach()
    return torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--swap", type=int, default=4, help="blocks swapped (at most blocks - 2)")
    parser.add_argument("--width", type=int, default=512, help="hidden size, a multiple of 128 (FLUX.1: 3072)")
    parser.add_argument("--tokens", type=int, default=256, help="image tokens (a square number)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadier figures on a busy machine)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {device}, threads {torch.get_num_threads()}, {args.blocks} FLUX single blocks "
          f"of width {args.width}, {args.tokens} tokens, LoRA rank 16, checkpointing; medians of {args.steps}, "
          "swap 0 and swap N run in turns")  # fmt: skip
    for kind, label in ((0, "training step (forward + backward)"), (1, "sampling call (forward only)")):
        setups = [_setup(args, 0), _setup(args, args.swap)]
        plain, swapped = _interleaved([setup[kind] for setup in setups], args.steps, sync)
        print(f"{label:36s} swap 0: {plain * 1000:8.1f} ms   swap {args.swap}: {swapped * 1000:8.1f} ms   "
              f"ratio {swapped / plain:.3f}")  # fmt: skip
        for setup in setups:
            setup[2].detach()
    if device.type == "cuda":
        plain, swapped = _peak_gib(args, 0), _peak_gib(args, args.swap)
        print(f"peak device memory, training step    swap 0: {plain:8.3f} GiB swap {args.swap}: {swapped:8.3f} GiB")


if __name__ == "__main__":
    main()
