"""The one stacking rule for everything that wraps a module's ``forward`` from outside (fp8, LoRA, gradient
checkpointing, block swap).

Each module gets an ordered chain of wrappers, each at a fixed :class:`Layer`; a call runs the outermost wrapper,
which calls the next one inwards through ``inner``, down to the module's own forward. Wrappers attach and detach
in any order; while a chain exists the module's instance ``forward`` is one dispatcher (the same object for as long
as anything is attached), and when the last wrapper leaves, the module gets back exactly the instance ``forward`` it
had (none, usually). A wrapper is ``fn(module, inner, *args, **kwargs)``. ``nn.Module.compile`` keeps working on
top: the compiled call goes through the dispatcher like any other.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from torch import nn

_CHAIN = "_forward_wrappers"


class Layer(IntEnum):
    """Where a wrapper sits, innermost first; within ADAPTER, wrappers run in the order they were attached."""

    BASE = 10  # computes the module's own operation instead of its forward (fp8 upcast); ``inner`` unused
    ADAPTER = 20  # adds to the base output of a layer (LoRA); several may stack
    CHECKPOINT = 30  # recomputes a whole block in backward (gradient checkpointing)
    PLACEMENT = 40  # where a block's weights live while it runs (block swap)


_SHARED_LAYERS = {Layer.ADAPTER}

Wrapper = Callable[..., Any]  # fn(module, inner, *args, **kwargs)


@dataclass
class _Chain:
    saved_forward: Callable[..., Any] | None  # the instance forward the module had before the first wrapper
    dispatch: Callable[..., Any]
    entries: list[tuple[Layer, Hashable, Wrapper]] = field(default_factory=list)  # innermost first
    fns: tuple[Wrapper, ...] = ()


def _run(module: nn.Module, chain: _Chain, fns: tuple[Wrapper, ...], index: int, *args, **kwargs):
    if index < 0:
        if chain.saved_forward is not None:
            return chain.saved_forward(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)
    return fns[index](module, functools.partial(_run, module, chain, fns, index - 1), *args, **kwargs)


def _chained_forward(self: nn.Module, *args, **kwargs):
    chain = self.__dict__[_CHAIN]
    return _run(self, chain, chain.fns, len(chain.fns) - 1, *args, **kwargs)


def attach(module: nn.Module, layer: Layer, key: Hashable, fn: Wrapper) -> None:
    """Add ``fn`` to ``module``'s chain at ``layer`` under ``key`` (unique per module). Only ADAPTER holds several
    wrappers; a second one at another layer is a RuntimeError naming the first."""
    chain = module.__dict__.get(_CHAIN)
    if chain is None:
        chain = _Chain(module.__dict__.get("forward"), types.MethodType(_chained_forward, module))
        module.__dict__[_CHAIN] = chain
        module.forward = chain.dispatch
    for other_layer, other_key, _ in chain.entries:
        if other_key == key:
            raise RuntimeError(f"{type(module).__name__}: {key!r} is already attached")
        if other_layer == layer and layer not in _SHARED_LAYERS:
            raise RuntimeError(f"{type(module).__name__}: {layer.name} already holds {other_key!r}; detach it first")
    position = sum(1 for entry_layer, _, _ in chain.entries if entry_layer <= layer)
    chain.entries.insert(position, (layer, key, fn))
    chain.fns = tuple(entry[2] for entry in chain.entries)


def detach(module: nn.Module, key: Hashable) -> None:
    """Remove the wrapper attached under ``key``; the last one out restores the module's original forward."""
    chain = module.__dict__.get(_CHAIN)
    index = next((i for i, entry in enumerate(chain.entries) if entry[1] == key), None) if chain else None
    if index is None:
        raise RuntimeError(f"{type(module).__name__}: {key!r} is not attached")
    del chain.entries[index]
    chain.fns = tuple(entry[2] for entry in chain.entries)
    if chain.entries:
        return
    if module.__dict__.get("forward") is not chain.dispatch:
        raise RuntimeError(f"{type(module).__name__}: forward was replaced outside the wrapper chain; cannot restore")
    del module.__dict__[_CHAIN]
    if chain.saved_forward is None:
        del module.forward
    else:
        module.forward = chain.saved_forward


def is_attached(module: nn.Module, key: Hashable) -> bool:
    chain = module.__dict__.get(_CHAIN)
    return chain is not None and any(entry[1] == key for entry in chain.entries)


def attached(module: nn.Module) -> list[tuple[Layer, Hashable]]:
    """(layer, key) of every wrapper on ``module``, innermost first."""
    chain = module.__dict__.get(_CHAIN)
    return [(layer, key) for layer, key, _ in chain.entries] if chain else []
