"""Activation memory of one training step, measured, not fitted: the denoiser runs on the ``meta`` device with
the real shapes while every allocation and free is tracked (storages, by identity), so peaks include what autograd
saves, the temporaries of each op, gradients flowing back and the recompute of a checkpointed block.

Three rules make meta behave like the GPU the estimate is for (``target="cuda"``):

- **Autocast.** CUDA autocast's casts are applied at the Python API (``_CudaAutocast``): matmul-like ops run in the
  compute dtype, norms, reductions and pointwise transcendental ops in fp32 (PyTorch's CUDA op lists), and casts of
  leaf tensors that require grad are cached for the autocast region, as CUDA autocast does. Only the outermost call
  is looked at: a composite function outside the lists that calls a listed op inside is not cast (none in the
  FLUX, SD3, CLIP or T5 code paths).
- **Attention.** ``scaled_dot_product_attention`` runs as the CUDA kernel it would pick: flash attention
  (fp16/bf16, no mask, head dim <= 256), else memory-efficient attention (the mask as a bias padded to 8 keys).
  Their autograd saves q, k, v, the output and an fp32 log-sum-exp of B*H*L (efficient: L rounded up to 32); the
  B*H*L^2 scores of the math path that meta would otherwise take never exist. ``target="cpu"`` runs CPU's flash
  kernel instead, which saves the same plus the mask, so the model can be checked on CPU against real runs.
- **Kernel workspaces** (cuBLAS, the flash backward's fp32 dq accumulator) are not tensors and are not counted.

The whole model never runs: the part outside the blocks runs with each block replaced by a stub that passes its
streams through, and each distinct block once, with gradients flowing in and out as in the middle of the model.
``ActivationProfile.peak`` then walks the forward and backward through all blocks. A checkpointed block recomputes
in its backward under the same emulation (function modes stay active there); its autocast cast cache is the
forward's, where CUDA starts a new one, so fp32 master weights under autocast (full fine-tuning without
``--full_bf16``) count their cast copies as kept to the backward (an upper bound).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from library.memory.wrappers import attached

# CUDA autocast's op lists (aten/src/ATen/autocast_mode.cpp; torch.testing._internal.autocast_test_lists)
LOWER_PRECISION_OPS = frozenset({
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "addmm", "addmv", "addr", "addbmm",
    "baddbmm", "einsum", "chain_matmul", "linalg_vecdot", "linalg_multi_dot", "conv1d", "conv2d", "conv3d",
    "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
})  # fmt: skip
FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "rms_norm", "group_norm", "norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div",
    "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss",
    "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
    "pdist", "cdist", "renorm", "logsumexp",
})  # fmt: skip
FP32_OUTPUT_OPS = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum"})  # computed with dtype=fp32
PROMOTE_OPS = frozenset({"addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "tensordot",
                         "scatter_add", "index_put"})  # fmt: skip
TARGETS = ("cuda", "cpu")


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created while active and still alive; ``peak`` is the most at any moment.

    An op's output that shares a storage with one of its inputs is a view (or in place), not an allocation, so
    tensors that existed before (weights) are never counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and (key := _storage_key(t)) not in inputs and key not in self._sizes:
                storage = t.untyped_storage()
                self._sizes[key] = storage.nbytes()
                self.live += self._sizes[key]
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out


def _cast(value: object, dtype: torch.dtype, cache: dict[int, Tensor]) -> object:
    if not isinstance(value, Tensor) or not value.is_floating_point() or value.dtype in (dtype, torch.float64):
        return value
    if value.is_leaf and value.requires_grad:
        if id(value) not in cache:
            cache[id(value)] = value.to(dtype)
        return cache[id(value)]
    return value.to(dtype)


class _CudaAutocast(TorchFunctionMode):
    """The casts of ``torch.autocast("cuda", dtype)`` (``dtype`` None: no autocast) and the attention rule of
    ``target``; each entry (the forward, a checkpointed block's recompute) has its own cast cache."""

    def __init__(self, dtype: torch.dtype | None, target: str):
        super().__init__()
        self.dtype = dtype
        self.target = target
        self._caches: list[dict[int, Tensor]] = []

    def __enter__(self):
        self._caches.append({})
        return super().__enter__()

    def __exit__(self, *exc):
        self._caches.pop()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.dtype is not None:
            args, kwargs = self._autocast(name, args, kwargs)
        if name == "scaled_dot_product_attention":
            return _attention(self.target, *args, **kwargs)
        return func(*args, **kwargs)

    def _autocast(self, name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        cache = self._caches[-1]
        if name in LOWER_PRECISION_OPS:
            return tree_map(lambda v: _cast(v, self.dtype, cache), (args, kwargs))
        if name in FP32_OPS:
            return tree_map(lambda v: _cast(v, torch.float32, cache), (args, kwargs))
        if name in FP32_OUTPUT_OPS and kwargs.get("dtype") is None and args and isinstance(args[0], Tensor):
            if args[0].is_floating_point() and args[0].dtype != torch.float64:
                return args, {**kwargs, "dtype": torch.float32}
        if name in PROMOTE_OPS:
            floats = [t.dtype for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.is_floating_point()]
            widest = max(floats, key=lambda d: torch.finfo(d).bits, default=None)
            if widest is not None:
                return tree_map(lambda v: _cast(v, widest, cache), (args, kwargs))
        return args, kwargs

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Enter unless already active (a checkpointed block's recompute runs in backward, outside the mode)."""
        if self in _get_current_function_mode_stack():
            yield
        else:
            with self:
                yield


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _attention(target: str, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, **_) -> Tensor:  # fmt: skip
    """The output of the kernel ``target`` would run, through that kernel's own autograd (what it saves)."""
    ops = torch.ops.aten
    if target == "cpu":
        mask = None if attn_mask is None else _float_mask(attn_mask, query.dtype)
        return ops._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                               attn_mask=mask, scale=scale)[0]  # fmt: skip
    flash_ok = query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256
    if attn_mask is None and flash_ok:
        return ops._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    bias = None
    if attn_mask is not None:
        bias = _float_mask(attn_mask, query.dtype)
        keys = bias.shape[-1]
        if keys % 8:
            bias = F.pad(bias, (0, 8 - keys % 8))[..., :keys]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    needs_lse = query.requires_grad or key.requires_grad or value.requires_grad
    return ops._scaled_dot_product_efficient_attention(query, key, value, bias, needs_lse, dropout_p, is_causal,
                                                        scale=scale)[0]  # fmt: skip


@dataclass(frozen=True)
class BlockMemory:
    """One block in the middle of the model, in bytes: ``retained`` stays allocated from its forward until its
    backward (what autograd saves, or a checkpoint's inputs; not its outputs, which the next block takes);
    ``forward_extra`` is the most allocated during its forward above its inputs; ``backward_extra`` the most
    during its backward above ``retained`` and the gradient of its outputs; ``stream`` its outputs' bytes."""

    retained: int
    forward_extra: int
    backward_extra: int
    stream: int


@dataclass(frozen=True)
class OuterMemory:
    """The model with each block list replaced by a pass-through stub, in bytes allocated: ``entry[i]`` when list
    i's first block starts; ``retained`` at the end of the forward (inputs, what the embedders and the final layer
    save, the loss); ``base[i]`` while list i's blocks run backward (without the gradient flowing in);
    ``forward_peak`` the most during the forward; ``after_peak`` / ``before_peak`` the most during the backward of
    the parts after / before the blocks."""

    entry: tuple[int, ...]
    retained: int
    base: tuple[int, ...]
    forward_peak: int
    after_peak: int
    before_peak: int


@dataclass(frozen=True)
class ActivationProfile:
    """Measured pieces of one step: the outer part and each block (``blocks[i]``: list i's, in forward order)."""

    outer: OuterMemory
    blocks: tuple[tuple[BlockMemory, ...], ...]

    @property
    def retained(self) -> int:
        """Bytes allocated at the end of the forward, where the backward starts."""
        return self.outer.retained + sum(b.retained for blocks in self.blocks for b in blocks)

    def peak(self, block_grads: Sequence[Sequence[int]] = (), grads_kept: bool = True, grads_before: int = 0) -> int:
        """The most allocated at any moment of the forward and backward, walking through every block.

        ``block_grads[i][j]``: bytes of parameter gradients block j of list i makes in its backward (measured
        within its backward when the profile kept gradients); with ``grads_kept`` they stay allocated through the
        rest of the backward, else they go with that block's optimizer step. ``grads_before``: bytes allocated
        before the backward besides (gradient accumulation's, a fused backward pass's parameter and step)."""
        grads = [list(g) for g in block_grads] or [[0] * len(blocks) for blocks in self.blocks]
        all_blocks = sum(b.retained for blocks in self.blocks for b in blocks)
        moments = [self.outer.forward_peak + all_blocks, self.outer.after_peak + all_blocks]
        before = 0
        for entry, blocks in zip(self.outer.entry, self.blocks):
            for block in blocks:
                moments.append(entry + before + block.forward_extra)
                before += block.retained
        kept, made = all_blocks, 0
        for base, blocks, list_grads in reversed(list(zip(self.outer.base, self.blocks, grads))):
            for block, grad in zip(reversed(blocks), reversed(list_grads)):
                moments.append(base + kept + block.stream + block.backward_extra + made)
                kept -= block.retained
                made += grad if grads_kept else 0
        moments.append(self.outer.before_peak + made)
        return max(moments) + grads_before


@dataclass(frozen=True)
class BlockList:
    """One list of repeated blocks in a denoiser: the attribute holding the ``nn.ModuleList`` and the forward
    arguments that carry the per-block stream (what the block returns, in that order)."""

    attribute: str
    streams: tuple[str, ...]


@dataclass(frozen=True)
class _Shape:
    shape: torch.Size
    dtype: torch.dtype
    requires_grad: bool


class _Stub(nn.Module):
    """Stands in for a list's blocks: returns the streams plus a trainable zero (new tensors that require grad, as
    a block's outputs are), records the arguments of its first call and the allocated bytes when it starts and
    when the gradient of its outputs arrives."""

    def __init__(self, block: nn.Module, streams: tuple[str, ...], tracker: LiveBytes):
        super().__init__()
        self.signature = inspect.signature(type(block).forward)
        self.streams = streams
        self.tracker = tracker
        self.zero = nn.Parameter(torch.zeros((), device="meta"))
        self.arguments: dict[str, object] | None = None
        self.entry = 0
        self.base: int | None = None
        self.peak_after = 0

    def forward(self, *args, **kwargs):
        arguments = self.signature.bind(self, *args, **kwargs).arguments
        arguments.pop(next(iter(arguments)))
        if self.arguments is None:  # streams as shapes only: holding them would keep them allocated
            self.entry = self.tracker.live
            self.arguments = {k: _Shape(v.shape, v.dtype, v.requires_grad) if k in self.streams and v is not None else v
                              for k, v in arguments.items()}  # fmt: skip
        outs = [None if arguments[s] is None else arguments[s] + self.zero.to(arguments[s].dtype) for s in self.streams]
        live = [t for t in outs if t is not None and t.requires_grad]
        if live:
            live[-1].register_hook(self._gradient_arrives)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _gradient_arrives(self, grad: Tensor) -> None:
        if self.base is None:
            self.peak_after = self.tracker.peak
            self.base = self.tracker.live - grad.untyped_storage().nbytes()
            self.tracker.reset_peak()


@contextlib.contextmanager
def _gradients(params: Sequence[nn.Parameter], keep: bool) -> Iterator[None]:
    """Parameter gradients stay allocated during the run (``keep``) or go as soon as they arrive (a fused
    backward pass); either way none is left afterwards."""
    hooks = [] if keep else [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for p in params:
            p.grad = None


def _tensors(value: object) -> list[Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


def _bytes(tensors: Sequence[Tensor]) -> int:
    return sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def measure_outer(
    model: nn.Module,
    lists: Sequence[BlockList],
    forward: Callable[[], Tensor],
    autocast: _CudaAutocast,
    trainable: Sequence[nn.Parameter],
    keep_grads: bool,
) -> tuple[OuterMemory, list[dict[str, object]]]:
    """Run ``forward()`` (which builds the inputs and calls ``model``) with each list's blocks replaced by a stub,
    then a mean-squared loss and its backward. Returns the memory and each list's recorded block arguments."""
    originals = [getattr(model, entry.attribute) for entry in lists]
    tracker = LiveBytes()
    stubs = [_Stub(blocks[0], entry.streams, tracker) for blocks, entry in zip(originals, lists)]
    try:
        for entry, stub in zip(lists, stubs):
            setattr(model, entry.attribute, nn.ModuleList([stub]))
        with _gradients(trainable, keep_grads), tracker:
            with autocast.active():
                prediction = forward()
            loss = (prediction.float() - torch.zeros_like(prediction, dtype=torch.float32)).pow(2).mean()
            forward_peak = tracker.peak
            del prediction
            retained = tracker.live
            tracker.reset_peak()
            loss.backward()
            before_peak = tracker.peak
    finally:
        for entry, original in zip(lists, originals):
            setattr(model, entry.attribute, original)
    bases = tuple(retained if stub.base is None else stub.base for stub in stubs)
    after_peak = stubs[-1].peak_after if stubs[-1].base is not None else before_peak
    outer = OuterMemory(tuple(stub.entry for stub in stubs), retained, bases, forward_peak, after_peak, before_peak)
    return outer, [stub.arguments or {} for stub in stubs]


def measure_block(
    block: nn.Module,
    arguments: dict[str, object],
    streams: tuple[str, ...],
    autocast: _CudaAutocast,
    trainable: Sequence[nn.Parameter],
    *,
    keep_grads: bool,
    first: bool = False,
) -> BlockMemory:
    """Run ``block`` forward and backward: its ``arguments`` as recorded, the streams replaced by fresh tensors
    (not leaves, so they can be freed as real ones are) that require grad as in the middle of the model, or as
    recorded for the ``first`` block of the model."""
    tracker = LiveBytes()
    with _gradients(trainable, keep_grads), tracker, autocast.active():
        zero = torch.zeros((), device="meta", requires_grad=True)
        base = tracker.live
        fresh = {}
        for name in streams:
            shape = arguments.get(name)
            if shape is not None:
                fresh[name] = torch.empty(shape.shape, dtype=shape.dtype, device="meta")
                if shape.requires_grad or not first:
                    fresh[name] = fresh[name] + zero.to(shape.dtype)
        shared = {k: _detached(v) for k, v in arguments.items() if k not in fresh}
        start = tracker.live
        tracker.reset_peak()
        outputs = _tensors(block(**shared, **fresh))
        forward_peak = tracker.peak
        del fresh
        stream = _bytes(outputs)
        retained = tracker.live - base - stream
        edges = [get_gradient_edge(t) for t in outputs if t.requires_grad]
        grads = [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in outputs if t.requires_grad]
        del outputs
        begin = tracker.live
        tracker.reset_peak()
        if edges:
            torch.autograd.backward(edges, grads)
        backward_peak = tracker.peak
    return BlockMemory(retained, forward_peak - start, backward_peak - begin, stream)


def _detached(value: object) -> object:
    """A recorded input as a leaf: the outer run's graph behind it is gone (its backward already ran)."""
    if isinstance(value, _Shape):
        return None
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    return value


def _wrapper(key: object) -> tuple:
    """What a forward wrapper changes for memory: a LoRA's rank, split and dropouts; else which wrapper it is."""
    values = (getattr(key, a, None) for a in ("lora_dim", "split_dims", "dropout", "rank_dropout"))
    settings = tuple(tuple(v) if isinstance(v, list) else v for v in values)
    return (type(key).__name__, settings) if any(s is not None for s in settings) else (type(key).__name__, key)


def block_signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures use the same activation memory: module types, parameter shapes, dtypes and
    trainability, and the wrappers on each forward (LoRA with its rank and dropouts, fp8, checkpointing)."""
    parts = []
    for name, module in block.named_modules():
        params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters(recurse=False))
        wrappers = tuple((layer, _wrapper(key)) for layer, key in attached(module))
        parts.append((name, type(module).__name__, params, wrappers))
    return tuple(parts)


def measure_activations(
    model: nn.Module,
    lists: Sequence[BlockList],
    forward: Callable[[], Tensor],
    *,
    trainable: Sequence[nn.Parameter],
    compute_dtype: torch.dtype | None,
    keep_grads: bool = True,
    target: str = "cuda",
) -> ActivationProfile:
    """The activation memory of one training step of ``model`` (on meta, with its LoRA/fp8/checkpointing already
    attached; ``trainable``: every parameter that trains, the network's included). ``compute_dtype`` is
    autocast's (None: no autocast). Parameter gradients are allocated where the backward makes them and kept
    to the end of each measured part (``keep_grads``), or freed as they arrive (a fused backward pass). Each
    distinct block runs once (and the model's first block once more when its inputs do not require grad)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    autocast = _CudaAutocast(compute_dtype, target)
    outer, arguments = measure_outer(model, lists, forward, autocast, trainable, keep_grads)
    measured: dict[tuple, BlockMemory] = {}
    profile = []
    for index, (entry, recorded) in enumerate(zip(lists, arguments)):
        blocks = []
        for position, block in enumerate(getattr(model, entry.attribute)):
            first = (
                index == 0
                and position == 0
                and not all(v.requires_grad for v in recorded.values() if isinstance(v, _Shape))
            )
            signature = (first, block_signature(block))
            if signature not in measured:
                measured[signature] = measure_block(block, recorded, entry.streams, autocast, trainable,
                                                    keep_grads=keep_grads, first=first)  # fmt: skip
            blocks.append(measured[signature])
        profile.append(tuple(blocks))
    return ActivationProfile(outer, tuple(profile))


def measure_forward(
    run: Callable[[], object], *, compute_dtype: torch.dtype | None, target: str = "cuda"
) -> tuple[int, int]:
    """(peak, saved) bytes of ``run()`` on meta: the most allocated at any moment, and what stays allocated
    besides its outputs while they are held (what autograd saved; 0 under ``torch.no_grad()``)."""
    tracker = LiveBytes()
    with tracker:
        with _CudaAutocast(compute_dtype, target):
            outputs = run()
        saved = tracker.live - _bytes(_tensors(outputs))
        peak = tracker.peak
        del outputs
    return peak, saved
