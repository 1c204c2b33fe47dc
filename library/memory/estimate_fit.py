"""What to change when a run does not fit: options that lower the peak, each checked by estimating again, and the
line a run that cannot fit stops with."""

from __future__ import annotations

import dataclasses

import torch

from library.memory.estimate import MemoryEstimate, MemoryOptions, estimate_memory, format_size, smallest_swap_that_fits
from library.memory.estimate_models import Architecture


def _candidates(arch: Architecture, options: MemoryOptions) -> list[tuple[str, dict]]:
    """Option changes that lower the peak, cheapest in speed or quality first, as (what to pass, the change)."""
    o = options
    changes = []
    if not o.gradient_checkpointing:
        changes.append(("--gradient_checkpointing", {"gradient_checkpointing": True}))
    if arch.text_encoders and not o.cache_text_encoder_outputs and not o.trains_text_encoder:
        changes.append(("--cache_text_encoder_outputs", {"cache_text_encoder_outputs": True}))
    if arch.autoencoder and not o.cache_latents:
        changes.append(("--cache_latents", {"cache_latents": True}))
    if not o.fp8_base and o.network is not None:
        changes.append(("--fp8_base", {"fp8_base": True}))
    if o.network is None and not (o.fused_backward_pass and o.optimizer_type.lower() == "adafactor"):
        changes.append(("--optimizer_type adafactor --fused_backward_pass",
                        {"optimizer_type": "Adafactor", "fused_backward_pass": True,
                         "blockwise_fused_optimizers": False}))  # fmt: skip
    if o.network is None and not o.full_precision_weights and o.compute_dtype != torch.float32:
        changes.append(("--full_bf16" if o.compute_dtype == torch.bfloat16 else "--full_fp16",
                        {"full_precision_weights": True}))  # fmt: skip
    if not o.cpu_offload_checkpointing:
        changes.append(("--cpu_offload_checkpointing", {"gradient_checkpointing": True,
                                                        "cpu_offload_checkpointing": True}))  # fmt: skip
    if o.batch_size > 1:
        changes.append(("--train_batch_size 1", {"batch_size": 1}))
    return changes


def _swap_allowed(options: MemoryOptions) -> bool:
    return options.network is not None or options.fused_backward_pass or options.blockwise_fused_optimizers


def fitting_options(arch: Architecture, options: MemoryOptions, vram_budget_bytes: int, *,
                    target: str = "cuda") -> list[tuple[str, MemoryEstimate]]:  # fmt: skip
    """Ways to fit ``vram_budget_bytes``, each checked by estimating again: more blocks swapped, then each other
    change alone (with the fewest blocks swapped it then needs); when none fits alone, the changes added one by
    one until the run fits. Returns (the options to pass, the estimate with them)."""
    found: list[tuple[str, MemoryEstimate]] = []
    unswapped = dataclasses.replace(options, blocks_to_swap=0)
    _add_fit(found, "", estimate_memory(arch, unswapped, target=target), vram_budget_bytes)
    candidates = _candidates(arch, options)
    for words, change in candidates:
        _add_fit(found, words, estimate_memory(arch, dataclasses.replace(unswapped, **change), target=target),
                 vram_budget_bytes)  # fmt: skip
    combined, words = unswapped, []
    for index, (word, change) in enumerate(candidates):
        if found:
            break
        combined = dataclasses.replace(combined, **change)
        words.append(word)
        if index:
            _add_fit(found, " ".join(words), estimate_memory(arch, combined, target=target), vram_budget_bytes)
    return found


def _add_fit(found: list, words: str, estimate: MemoryEstimate, budget: int) -> None:
    if estimate.fits(budget):
        if words:
            found.append((words, estimate))
        return
    if not _swap_allowed(estimate.options):
        return
    n = smallest_swap_that_fits(estimate, budget)
    if n is not None:
        found.append(((words + " " if words else "") + f"--blocks_to_swap {n}", estimate.with_blocks_to_swap(n)))


def cannot_fit_message(arch: Architecture, options: MemoryOptions, vram_budget_bytes: int, *,
                       target: str = "cuda", estimate: MemoryEstimate | None = None) -> str:  # fmt: skip
    """The line a run that cannot fit stops with: the estimate against the budget, and options that would fit."""
    estimate = estimate or estimate_memory(arch, options, target=target)
    fits = fitting_options(arch, options, vram_budget_bytes, target=target)
    head = (
        f"estimated peak VRAM {format_size(estimate.vram)} exceeds the {format_size(vram_budget_bytes)} available "
        f"({arch.name or arch.family}, {options.resolution[0]}x{options.resolution[1]} x {options.batch_size})"
    )
    if not fits:
        return head + "; no combination of memory options fits: use a GPU with more memory or smaller buckets"
    shown = "; ".join(f"{words} (~{format_size(e.vram)})" for words, e in fits[:5])
    return f"{head}; options that fit: {shown}"
