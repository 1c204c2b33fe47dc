"""torch.compile of the denoiser's blocks (``--torch_compile``, ``--dynamo_backend``), attached from outside.

Each block's call is compiled in place (``nn.Module.compile``), so the block stays the same module: LoRA on its
Linear layers, gradient checkpointing on its forward and later block swap keep working, and state dicts keep their
keys. Shapes that change (buckets) recompile once per shape."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from library.errors import UserError

logger = logging.getLogger(__name__)


def check_backend(backend: str) -> None:
    """A one-line error for a backend this torch does not have (upstream lists some that no longer exist)."""
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise UserError(f"--dynamo_backend {backend}: not available in this torch; use one of {', '.join(known)}")


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor") -> int:
    """Compile every block's call with ``backend``; returns how many were compiled."""
    check_backend(backend)
    count = 0
    for block in blocks:
        block.compile(backend=backend)
        count += 1
    logger.info("torch.compile (%s): %d blocks compile on their first call of each shape", backend, count)
    return count


def compiler_available() -> bool:
    """Whether inductor can build kernels here (it needs a C++ compiler on the CPU)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except Exception:  # no compiler, or an inductor without the helper
        return False

