"""The memory estimate against measured peaks: full-size FLUX.1 dev with random weights built on the GPU, two
training steps per setting under CUDA autocast (bf16), peak = ``torch.cuda.max_memory_allocated()`` against
``estimate_memory(...).vram`` for the same options. Text encoders and AE are not loaded (cached outputs).

Settings: LoRA rank 16 (default targets, AdamW) at 1024x1024 batch 1 with gradient checkpointing at
--blocks_to_swap 0, 16 and 35; the same without checkpointing; full fine-tuning with Adafactor and a fused backward
pass (each parameter stepped and its gradient freed as it arrives), --full_bf16, checkpointing.

Block swap is the training's own (``library/memory/block_swap.py``, attached after the model is built on the GPU;
``prepare_for_training`` before each step, as the loop does). The peak is taken over the steps only (after the
model, the network and the swap are set up), as the estimate's training-step phase.

    .venv/bin/python bench/bench_memory_estimate.py [--out results.json]   # a CUDA GPU, full size (~40 GiB+)
    .venv/bin/python bench/bench_memory_estimate.py --tiny                 # CPU smoke check, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.memory.block_swap import split_flux_swap, swap_blocks  # noqa: E402
from library.memory.checkpointing import enable_block_checkpointing  # noqa: E402
from library.memory.estimate import MemoryOptions, NetworkSettings, estimate_memory  # noqa: E402
from library.memory.estimate_models import Architecture, FluxLayout  # noqa: E402
from library.models.flux.model import Flux, FluxParams  # noqa: E402
from library.models.flux.tiny import tiny_flux_params  # noqa: E402
from library.training.optimizers import build_optimizer  # noqa: E402
from networks import lora_flux  # noqa: E402

GIB = 1024**3
ADAFACTOR_ARGS = ("relative_step=False", "scale_parameter=False", "warmup_init=False")


def settings(tiny: bool) -> dict[str, MemoryOptions]:
    size = (128, 128) if tiny else (1024, 1024)
    lora = MemoryOptions(compute_dtype=torch.bfloat16, network=NetworkSettings("networks.lora_flux", 16, 16.0,
                         train_text_encoder=False), resolutions=(size,), text_length=32 if tiny else 512,
                         cache_latents=True, cache_text_encoder_outputs=True, gradient_checkpointing=True)  # fmt: skip
    swaps = (0, 2, 4) if tiny else (0, 16, 35)
    runs = {f"LoRA r16, checkpointing, swap {n}": dataclasses.replace(lora, blocks_to_swap=n) for n in swaps}
    runs["LoRA r16, no checkpointing"] = dataclasses.replace(lora, gradient_checkpointing=False)
    runs["full fine-tuning, Adafactor fused, full_bf16, checkpointing"] = dataclasses.replace(
        lora, network=None, optimizer_type="Adafactor", optimizer_args=ADAFACTOR_ARGS, fused_backward_pass=True,
        full_precision_weights=True,
    )  # fmt: skip
    return runs


def build_flux(params: FluxParams, dtype: torch.dtype, device: str, trained: bool) -> Flux:
    """Random weights made on ``device`` (no fp32 copy on the way)."""
    model = FluxLayout(params).build().to(dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.requires_grad_(trained)


def fused_adafactor(params: list[nn.Parameter]) -> None:
    """A fused backward pass: each parameter steps with its own Adafactor when its gradient is ready, which is
    then freed (as upstream's ``--fused_backward_pass``)."""
    from transformers.optimization import Adafactor

    optimizers = {id(p): Adafactor([p], lr=1e-5, relative_step=False, scale_parameter=False, warmup_init=False)
                  for p in params}  # fmt: skip

    def step(p: nn.Parameter) -> None:
        optimizers[id(p)].step()
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(step)


def prepare(params: FluxParams, options: MemoryOptions, device: str):
    """The model, what the step calls after the backward (the optimizer step, or nothing with a fused backward
    pass), and the block swappers."""
    full = options.network is None
    model = build_flux(params, options.trained_dtype if full else options.compute_dtype, device, full)
    layout = FluxLayout(params)
    after_backward = None
    if full:
        fused_adafactor([p for p in model.parameters() if p.requires_grad])
    else:
        with torch.device(device):
            network = lora_flux.create_network(1.0, options.network.dim, options.network.alpha, None, [None, None],
                                               model)  # fmt: skip
        network.apply_to(None, model, apply_text_encoder=False)
        groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
        _, optimizer = build_optimizer(options.optimizer_type, groups, 1e-4, list(options.optimizer_args))

        def after_backward():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    if options.gradient_checkpointing:
        enable_block_checkpointing(layout.blocks(model))
    swaps = []
    if options.blocks_to_swap:
        double, single = split_flux_swap(options.blocks_to_swap, params.depth, params.depth_single_blocks)
        swaps = swap_blocks(model, [(model.double_blocks, double, "double blocks"),
                                    (model.single_blocks, single, "single blocks")], device)  # fmt: skip
    return model, after_backward, swaps


def train_steps(model: Flux, params: FluxParams, options: MemoryOptions, device: str, after_backward, swaps,
                steps: int) -> list[float]:  # fmt: skip
    width, height = options.resolution
    layout = FluxLayout(params)
    forward = layout.forward(model, options.batch_size, width, height, layout.t5_tokens(options.text_length),
                             options.compute_dtype, options.apply_t5_attn_mask, device=device)  # fmt: skip
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for swap in swaps:
            swap.prepare_for_training()
        with torch.autocast(device, dtype=options.compute_dtype, enabled=device == "cuda"):
            pred = forward()
        loss = (pred.float() - torch.zeros_like(pred, dtype=torch.float32)).pow(2).mean()
        del pred
        loss.backward()
        if after_backward is not None:
            after_backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def measure(params: FluxParams, options: MemoryOptions, device: str, steps: int) -> dict:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model, after_backward, swaps = prepare(params, options, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = train_steps(model, params, options, device, after_backward, swaps, steps)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    for swap in swaps:
        swap.synchronize()
    del model, after_backward, swaps
    return {"measured": peak, "seconds_per_step": times[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke check: no measurement)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    params = tiny_flux_params(hidden_size=256, depth=4, depth_single_blocks=6) if args.tiny else FluxParams()
    arch = Architecture("flux", params, name="FLUX.1 dev" if not args.tiny else "tiny FLUX")
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; SDPA flash "
              f"{torch.backends.cuda.flash_sdp_enabled()}, efficient {torch.backends.cuda.mem_efficient_sdp_enabled()}, "
              f"cuDNN {torch.backends.cuda.cudnn_sdp_enabled()}")  # fmt: skip
    results = []
    for name, options in settings(args.tiny).items():
        started = time.perf_counter()
        estimate = estimate_memory(arch, options)
        estimated_in = time.perf_counter() - started
        row = {"setting": name, "estimate": estimate.vram, "estimate_seconds": estimated_in,
               "activations": estimate.activation_peak, **measure(params, options, device, args.steps)}  # fmt: skip
        results.append(row)
        measured = row["measured"]
        shown = "n/a (CPU)" if measured is None else f"{measured / GIB:7.2f} GiB"
        error = "" if measured is None else f"{100 * (estimate.vram - measured) / measured:+6.1f}%"
        print(f"{name:<62} estimate {estimate.vram / GIB:7.2f} GiB  measured {shown} {error}  "
              f"{row['seconds_per_step']:.2f} s/step, estimated in {estimated_in:.1f} s")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
