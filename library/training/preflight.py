"""The memory pre-flight of every training run: before any model loads, estimate peak VRAM and RAM for the chosen
options from the files' headers (``library/memory/estimate.py``), print it in the start-up summary, pick
``--blocks_to_swap auto``, and stop a run that cannot fit with the estimate and the options that would fit."""

from __future__ import annotations

import argparse
import logging

import torch

from library.errors import UserError
from library.memory.estimate import MemoryEstimate, MemoryOptions, estimate_memory, smallest_swap_that_fits
from library.memory.estimate_fit import cannot_fit_message
from library.training.family import FamilySpec

logger = logging.getLogger(__name__)

GIB = 1024**3


def vram_budget(args: argparse.Namespace, device: torch.device) -> int | None:
    """Bytes the run may use: --vram_budget (GiB) if given, else the device's free memory; None on a device
    without a memory figure (the CPU) and no budget given."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if args.vram_budget is not None:
        budget = int(args.vram_budget * GIB)
        return budget if free is None else min(budget, free)
    return free


def memory_preflight(args: argparse.Namespace, spec: FamilySpec, groups: list, device: torch.device,
                     full_finetuning: bool) -> MemoryEstimate | None:  # fmt: skip
    """Estimate, report and check; sets ``args.blocks_to_swap`` to a number (resolving ``auto``)."""
    auto = args.blocks_to_swap == "auto"
    datasets = [(tuple(d.config.resolution), d.config.batch_size) for group in groups[:1] for d in group.datasets]
    options = MemoryOptions.from_args(args, datasets, full_finetuning=full_finetuning)
    try:
        arch = spec.memory_architecture(args)
        estimate = estimate_memory(arch, options, compare_checkpointing=True)
    except UserError:
        raise
    except Exception as e:  # the estimate advises; a model it cannot rebuild must not stop a run it was not asked for
        if auto:
            raise UserError(f"--blocks_to_swap auto: the memory estimate failed ({e}); give a number") from None
        logger.warning("memory estimate unavailable (%s: %s); training goes on without it", type(e).__name__, e)
        args.blocks_to_swap = args.blocks_to_swap or 0
        return None
    budget = vram_budget(args, device)
    if auto:
        if budget is None:
            logger.warning("--blocks_to_swap auto: %s has no memory figure and no --vram_budget is given; no "
                           "blocks are swapped", device)  # fmt: skip
            args.blocks_to_swap = 0
        else:
            swap = smallest_swap_that_fits(estimate, budget)
            if swap is None:
                raise UserError(cannot_fit_message(arch, options, budget, estimate=estimate))
            args.blocks_to_swap = swap
            estimate = estimate.with_blocks_to_swap(swap)
            logger.info("--blocks_to_swap auto: %d blocks swapped fit %.2f GiB", swap, budget / GIB)
    elif budget is not None and not estimate.fits(budget):
        raise UserError(cannot_fit_message(arch, options, budget, estimate=estimate))
    args.blocks_to_swap = args.blocks_to_swap or 0
    logger.info("memory estimate (before loading):\n%s", estimate.format())
    return estimate
