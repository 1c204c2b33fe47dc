"""``--blocks_to_swap`` and ``--offload`` for the denoiser of the inference scripts (FLUX.1 transformer, SD3 MMDiT):
where it lives while it samples and between images. The other models follow :func:`on_device` alone."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from library.inference.images import on_device
from library.memory.block_swap import BlockSwap, move_except_swapped

SwapGroups = Sequence[tuple[Sequence[nn.Module], int, str]]  # (blocks, how many of the last to swap, name)


def add_blocks_to_swap_arg(group: argparse._ArgumentGroup, limit: str) -> None:
    """``--blocks_to_swap N``; ``limit`` says what N counts and its largest value for the family."""
    group.add_argument(
        "--blocks_to_swap", type=int, default=None, metavar="N",
        help=f"keep the denoiser's last N blocks in host memory and stream each to the device ahead of use ({limit}); "
        "with --offload too, the blocks kept on the device leave it after each image",
    )  # fmt: skip


class DenoiserPlacement:
    """Puts the denoiser on the device for sampling (:meth:`sampling`).

    - Without swap (no group with a count), as any model: :func:`on_device`, moved whole, and back to the CPU
      afterwards with ``offload``.
    - With swap the model must be loaded in host memory (with any LoRA merged: merging writes the weights the swaps
      move); the swapped blocks stream from it under the forward-only schedule, so consecutive steps move only the
      blocks they must, and the model is never moved whole. Without ``offload`` the swaps attach here, once, and
      the resident blocks stay on the device between images; with ``offload`` the same swaps attach for each
      sampling and detach after it, so the text encoders and the autoencoder run with none of the denoiser on the
      device.
    """

    def __init__(self, model: nn.Module, groups: SwapGroups, device: torch.device, offload: bool):
        self.model, self.device, self.offload = model, device, offload
        self.swaps = [BlockSwap(blocks, count, device, name=name) for blocks, count, name in groups if count]
        if self.swaps and not offload:
            self._attach()

    def _attach(self) -> None:
        """As ``swap_blocks``: the swapped weights stay in host memory, the rest of the model goes to the device."""
        for swap in self.swaps:
            swap.attach()
        move_except_swapped(self.model, self.device, self.swaps)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[nn.Module]:
        if not self.swaps:
            with on_device(self.model, self.device, self.offload):
                yield self.model
            return
        if self.offload:
            self._attach()
        try:
            with contextlib.ExitStack() as stack:
                for swap in self.swaps:
                    stack.enter_context(swap.forward_only())
                yield self.model
        finally:
            if self.offload:
                for swap in self.swaps:
                    swap.detach()
                self.model.to("cpu")

    def describe(self) -> str:
        """Where the denoiser lives, for the log."""
        if self.swaps:
            counts = ", ".join(f"{swap.num_swap} {swap.name}" for swap in self.swaps)
            return f"{self.device}, {counts} swapped from cpu" + (" (offload)" if self.offload else "")
        return "cpu (offload)" if self.offload else str(self.device)
