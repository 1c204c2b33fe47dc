"""Memory pre-flight: before anything is loaded, the peak VRAM and RAM of a training run for its options.

The pieces, each exact or measured, none fitted:

- **weights**: every model rebuilt on the meta device from its checkpoint header (``estimate_models``), with the
  dtype each loader gives each tensor (fp8 block Linears with ``fp8_base``); byte counts equal the loaded models'.
- **trainable weights, gradients, optimizer state**: the network built on the meta models by its own module
  (``create_network``), or the denoiser for full fine-tuning; optimizer state from each optimizer's state layout
  (``optimizer_memory``), gradients in the parameters' dtype (one parameter at a time with a fused backward pass,
  one block with blockwise optimizers).
- **activations**: measured on meta for the run's largest bucket and batch (``estimate_activations``).
- **block swap**: the swapped blocks' weights leave the GPU for RAM (``library/memory/block_swap.py`` trades
  storage between outgoing and incoming blocks, so nothing else is allocated on the GPU), plus each offloader's
  pinned staging buffers.

``estimate_memory`` gives a ``MemoryEstimate``; ``smallest_swap_that_fits`` answers ``--blocks_to_swap auto``;
``estimate_fit.cannot_fit_message`` names options that would fit, each checked by estimating again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import T5EncoderModel

from library.memory.checkpointing import disable_block_checkpointing, enable_block_checkpointing
from library.memory.estimate_activations import ActivationProfile, measure_activations, measure_forward
from library.memory.estimate_models import (
    Architecture,
    ComponentMemory,
    build_autoencoder,
    build_text_encoder,
    cast_block_linears_to_fp8,
    module_memory,
    swapped_weight_bytes,
    tensor_bytes,
)
from library.memory.estimate_optimizer import OptimizerMemory, TrainedParam, optimizer_memory
from library.memory.fp8 import enable_fp8_linear
from library.training.targets import import_network_module

logger = logging.getLogger(__name__)

GIB = 1024**3
CLIP_TOKENS = 77
# pinned host staging per offloader: two 32 MiB buffers per direction (library/memory/movers.py, CudaMover)
SWAP_STAGING_BYTES = 2 * 2 * (32 << 20)


@dataclass(frozen=True)
class NetworkSettings:
    """The network to train (``--network_*``); learning rates of 0 freeze a part, as in training."""

    module: str
    dim: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    args: dict[str, str] = field(default_factory=dict)
    train_unet: bool = True
    train_text_encoder: bool = True
    unet_lr: float | None = None
    text_encoder_lr: float | Sequence[float] | None = None
    learning_rate: float = 1e-4

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NetworkSettings:
        """``--network_*`` and the learning rates of a network training command line."""
        parsed = {}
        for entry in args.network_args or []:
            key, _, value = entry.partition("=")
            parsed[key.strip()] = value.strip()
        text_encoder_lr = args.text_encoder_lr
        return cls(
            module=args.network_module, dim=args.network_dim, alpha=args.network_alpha, dropout=args.network_dropout,
            args=parsed, train_unet=not args.network_train_text_encoder_only,
            train_text_encoder=not args.network_train_unet_only, unet_lr=args.unet_lr,
            text_encoder_lr=tuple(text_encoder_lr) if isinstance(text_encoder_lr, list) else text_encoder_lr,
            learning_rate=args.learning_rate,
        )  # fmt: skip


@dataclass(frozen=True)
class MemoryOptions:
    """The options of a run that decide its memory. ``network`` None means full fine-tuning of the denoiser
    (and of the text encoders with ``finetune_text_encoders``). ``resolutions``: the buckets' (width, height);
    the largest area decides. ``text_length``: T5 tokens (None: the family's default)."""

    compute_dtype: torch.dtype = torch.bfloat16
    network: NetworkSettings | None = None
    finetune_text_encoders: bool = False
    fp8_base: bool = False
    full_precision_weights: bool = False  # --full_bf16 / --full_fp16: trained weights in the compute dtype
    optimizer_type: str = "AdamW"
    optimizer_args: tuple[str, ...] = ()
    fused_backward_pass: bool = False
    blockwise_fused_optimizers: bool = False
    gradient_accumulation_steps: int = 1
    batch_size: int = 1
    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)
    text_length: int | None = None
    apply_t5_attn_mask: bool = False
    gradient_checkpointing: bool = False
    cpu_offload_checkpointing: bool = False
    cache_latents: bool = False
    cache_text_encoder_outputs: bool = False
    denoiser_loaded_while_caching: bool = True  # the recipe loads every model before it fills the caches
    blocks_to_swap: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or not self.resolutions:
            raise ValueError("batch_size must be at least 1 and resolutions must not be empty")
        if self.blocks_to_swap < 0:
            raise ValueError(f"blocks_to_swap must not be negative, got {self.blocks_to_swap}")
        if self.cpu_offload_checkpointing and not self.gradient_checkpointing:
            raise ValueError("cpu_offload_checkpointing needs gradient_checkpointing")
        if self.fused_backward_pass and self.blockwise_fused_optimizers:
            raise ValueError("fused_backward_pass and blockwise_fused_optimizers exclude each other")

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, datasets: Sequence[tuple[tuple[int, int], int]], *, full_finetuning: bool = False
    ) -> MemoryOptions:
        """The options of a training command line; ``datasets``: each dataset's ((width, height), batch size), of
        which the one with the most pixels per batch is estimated. ``--blocks_to_swap auto`` (or none) is 0 here:
        ``smallest_swap_that_fits`` picks it."""
        resolution, batch = max(datasets, key=lambda d: d[0][0] * d[0][1] * d[1])
        network = None if full_finetuning else NetworkSettings.from_args(args)
        swap = args.blocks_to_swap if isinstance(args.blocks_to_swap, int) else 0
        return cls(
            compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32),
            network=network, finetune_text_encoders=full_finetuning and bool(getattr(args, "train_text_encoder", 0)),
            fp8_base=not full_finetuning and (args.fp8_base or args.fp8_base_unet),
            full_precision_weights=args.full_bf16 or args.full_fp16, optimizer_type=args.optimizer_type or "AdamW",
            optimizer_args=tuple(args.optimizer_args or ()),
            fused_backward_pass=bool(getattr(args, "fused_backward_pass", False)),
            blockwise_fused_optimizers=bool(getattr(args, "blockwise_fused_optimizers", False)),
            gradient_accumulation_steps=args.gradient_accumulation_steps, batch_size=batch,
            resolutions=(tuple(resolution),), text_length=getattr(args, "t5xxl_max_token_length", None),
            apply_t5_attn_mask=bool(getattr(args, "apply_t5_attn_mask", False)),
            gradient_checkpointing=args.gradient_checkpointing or args.cpu_offload_checkpointing,
            cpu_offload_checkpointing=args.cpu_offload_checkpointing,
            cache_latents=args.cache_latents or args.cache_latents_to_disk,
            cache_text_encoder_outputs=args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk,
            blocks_to_swap=swap,
        )  # fmt: skip

    @property
    def resolution(self) -> tuple[int, int]:
        """The bucket with the most pixels (ties: the first)."""
        return max(self.resolutions, key=lambda r: r[0] * r[1])

    @property
    def trained_dtype(self) -> torch.dtype:
        """Trained weights: fp32 masters, or the compute dtype with --full_bf16 / --full_fp16."""
        return self.compute_dtype if self.full_precision_weights else torch.float32

    @property
    def text_encoders_on_gpu(self) -> bool:
        """As the recipes do: the encoders leave the GPU once their outputs are cached, unless one trains."""
        return not self.cache_text_encoder_outputs or self.trains_text_encoder

    @property
    def trains_text_encoder(self) -> bool:
        if self.network is None:
            return self.finetune_text_encoders
        return self.network.train_text_encoder


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate for one set of options, in bytes. ``vram`` is the peak of a training step; ``phases`` the
    peak of each moment that can be the highest; ``ram`` what the run keeps in host memory besides the process."""

    architecture: str
    options: MemoryOptions
    components: tuple[ComponentMemory, ...]
    on_gpu: dict[str, bool]
    trainable_params: int
    trained_weights: dict[torch.dtype, int]
    optimizer: OptimizerMemory
    gradients: int
    activations: ActivationProfile
    activation_peak: int
    encode_peak: int
    swap_table: tuple[tuple[int, int], ...]  # blocks_to_swap n -> (bytes moved off the GPU, offloaders)
    offloaded_checkpoints: int = 0
    other_checkpointing_peak: int | None = None  # activations with gradient checkpointing the other way
    phases: dict[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def blocks_to_swap(self) -> int:
        return self.options.blocks_to_swap

    @property
    def max_blocks_to_swap(self) -> int:
        return len(self.swap_table) - 1

    @property
    def swap_saving(self) -> int:
        return self.swap_table[self.blocks_to_swap][0]

    @property
    def weights_on_gpu(self) -> int:
        return sum(c.total for c in self.components if self.on_gpu[c.name]) - self.swap_saving

    @property
    def vram(self) -> int:
        return max(self.phases.values())

    @property
    def ram(self) -> int:
        return sum(self.ram_parts.values())

    @property
    def ram_parts(self) -> dict[str, int]:
        parts = {c.name: c.total for c in self.components if not self.on_gpu[c.name]}
        if self.swap_saving:
            parts["swapped blocks"] = self.swap_saving
            parts["pinned staging buffers"] = SWAP_STAGING_BYTES * self.swap_table[self.blocks_to_swap][1]
        if self.offloaded_checkpoints:
            parts["offloaded checkpoints"] = self.offloaded_checkpoints
        return parts

    def with_blocks_to_swap(self, blocks_to_swap: int) -> MemoryEstimate:
        """The same run with another ``--blocks_to_swap`` (activations do not change)."""
        if not 0 <= blocks_to_swap <= self.max_blocks_to_swap:
            raise ValueError(f"blocks_to_swap must be 0..{self.max_blocks_to_swap}, got {blocks_to_swap}")
        options = dataclasses.replace(self.options, blocks_to_swap=blocks_to_swap)
        moved = self.swap_table[blocks_to_swap][0] - self.swap_saving
        unmoved = set() if options.denoiser_loaded_while_caching else {"caching"}
        phases = {name: value - (0 if name in unmoved else moved) for name, value in self.phases.items()}
        return dataclasses.replace(self, options=options, phases=phases)

    def fits(self, vram_budget_bytes: int) -> bool:
        return self.vram <= vram_budget_bytes

    def format(self) -> str:
        """The start-up summary: what takes the memory and the peak."""
        o, size = self.options, format_size
        width, height = o.resolution
        what = "full fine-tuning" if o.network is None else f"{o.network.module} network"
        lines = [f"memory estimate: {self.architecture}, {what}, {o.optimizer_type}, {_dtype_name(o.compute_dtype)}, "
                 f"{width}x{height} x {o.batch_size}{_memory_features(o)}"]  # fmt: skip
        for c in self.components:
            where = "on the GPU" if self.on_gpu[c.name] else "in RAM"
            lines.append(f"  {c.name:<16} {size(c.total):>10} {where} ({_by_dtype(c.by_dtype)})")
        lines += [
            f"  {'trained weights':<16} {size(sum(self.trained_weights.values())):>10} "
            f"({self.trainable_params / 1e6:.1f}M parameters, {_by_dtype(self.trained_weights)})",
            f"  {'optimizer state':<16} {size(self.optimizer.state):>10} ({self.optimizer.rule})",
            f"  {'gradients':<16} {size(self.gradients):>10} at most at once",
            f"  {'activations':<16} {size(self.activation_peak):>10} at the peak "
            f"({size(self.activations.retained)} kept from forward to backward){self._other_checkpointing()}",
        ]  # fmt: skip
        if self.blocks_to_swap:
            lines.append(f"  {'block swap':<16} {size(self.swap_saving):>10} of weights in RAM instead of VRAM "
                         f"({self.blocks_to_swap} blocks)")  # fmt: skip
        peaks = ", ".join(f"{name} {size(value)}" for name, value in self.phases.items())
        lines.append(f"  peak VRAM ~{size(self.vram)} ({peaks}); RAM ~{size(self.ram)} besides the process")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _other_checkpointing(self) -> str:
        if self.other_checkpointing_peak is None:
            return ""
        way = "without" if self.options.gradient_checkpointing else "with"
        return f"; {format_size(self.other_checkpointing_peak)} {way} gradient checkpointing"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8",
            torch.uint8: "uint8", torch.int64: "int64"}.get(dtype, str(dtype).removeprefix("torch."))  # fmt: skip


def format_size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _by_dtype(by_dtype: dict[torch.dtype, int]) -> str:
    return ", ".join(f"{_dtype_name(d)} {format_size(n)}" for d, n in sorted(by_dtype.items(), key=lambda x: -x[1]))


def _memory_features(o: MemoryOptions) -> str:
    features = [name for name, on in (
        ("fp8 base", o.fp8_base), ("gradient checkpointing", o.gradient_checkpointing),
        ("CPU-offloaded checkpoints", o.cpu_offload_checkpointing), ("fused backward pass", o.fused_backward_pass),
        ("blockwise optimizers", o.blockwise_fused_optimizers), ("cached latents", o.cache_latents),
        ("cached text encoder outputs", o.cache_text_encoder_outputs),
        (f"{o.blocks_to_swap} blocks swapped", o.blocks_to_swap > 0),
    ) if on]  # fmt: skip
    return f"; {', '.join(features)}" if features else ""


@dataclass
class _Run:
    """The run's models on meta, with the network attached and the memory features applied."""

    denoiser: nn.Module
    encoders: list[nn.Module | None]
    vae: nn.Module | None
    network: nn.Module | None
    trainable: list[nn.Parameter]
    zero_init: set[int]


_ENCODER_ORDER = {"flux": ("CLIP-L", "T5-XXL"), "sd3": ("CLIP-L", "CLIP-G", "T5-XXL")}


def _build_run(arch: Architecture, options: MemoryOptions) -> _Run:
    layout = arch.layout
    full = options.network is None
    denoiser = layout.build().to(options.trained_dtype if full else options.compute_dtype)
    if options.fp8_base and not full:
        cast_block_linears_to_fp8(layout.blocks(denoiser))
        enable_fp8_linear(denoiser)
    denoiser.requires_grad_(full)
    specs = {spec.name: spec for spec in arch.text_encoders}
    encoders = []
    for name in _ENCODER_ORDER[arch.family]:
        encoder = None
        if name in specs:
            trained = full and options.finetune_text_encoders
            encoder = build_text_encoder(specs[name], options.trained_dtype if trained else options.compute_dtype)
            encoder.requires_grad_(trained)
        encoders.append(encoder)
    vae = build_autoencoder(arch.autoencoder, options.compute_dtype) if arch.autoencoder else None
    network, zero_init = None, set()
    if options.network is not None:
        network, zero_init = _build_network(options.network, encoders, denoiser, vae, options.trained_dtype)
    if options.gradient_checkpointing:
        enable_block_checkpointing(layout.blocks(denoiser))
    modules = [m for m in (denoiser, *encoders, network) if m is not None]
    trainable = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
    return _Run(denoiser, encoders, vae, network, trainable, zero_init)


def _build_network(settings: NetworkSettings, encoders: list, denoiser: nn.Module, vae: nn.Module | None,
                   dtype: torch.dtype) -> tuple[nn.Module, set[int]]:  # fmt: skip
    """The network as the recipe makes it: its module's ``create_network`` on the meta models, applied, with the
    optimizer groups deciding what trains. Returns it and the ids of parameters that start at zero (LoRA ups)."""
    module = import_network_module(settings.module)
    quiet = logging.getLogger(module.__name__), logging.getLogger("networks")
    levels = [logger_.level for logger_ in quiet]
    for logger_ in quiet:  # the recipe builds the same network again and says what it has to say then
        logger_.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            network = module.create_network(1.0, settings.dim, settings.alpha, vae, encoders, denoiser,
                                            neuron_dropout=settings.dropout, **settings.args)  # fmt: skip
    finally:
        for logger_, level in zip(quiet, levels):
            logger_.setLevel(level)
    network.apply_to(encoders, denoiser, settings.train_text_encoder, settings.train_unet)
    network.prepare_optimizer_params(settings.text_encoder_lr, settings.unet_lr, settings.learning_rate)
    network.to(dtype)
    zero_init = {id(p) for name, p in network.named_parameters() if "lora_up" in name or ".oft_blocks." in name}
    return network, zero_init


def _block_params(arch: Architecture, run: _Run) -> tuple[list[list[list[nn.Parameter]]], list[nn.Parameter]]:
    """The trained parameters by block (``[list][block]``; a network module goes with the block of the layer it
    adapts) and those outside the blocks."""
    owner: dict[int, tuple[int, int]] = {}
    grouped: list[list[list[nn.Parameter]]] = []
    for i, entry in enumerate(arch.layout.lists):
        blocks = getattr(run.denoiser, entry.attribute)
        grouped.append([[] for _ in blocks])
        for j, block in enumerate(blocks):
            owner.update({id(x): (i, j) for x in (*block.modules(), *block.parameters())})
    if run.network is not None:
        for adapter in run.network.adapters:
            if id(adapter.org_module) in owner:
                owner.update({id(p): owner[id(adapter.org_module)] for p in adapter.parameters()})
    outside = []
    for p in run.trainable:
        if id(p) in owner:
            i, j = owner[id(p)]
            grouped[i][j].append(p)
        else:
            outside.append(p)
    return grouped, outside


def _components(arch: Architecture, run: _Run) -> tuple[ComponentMemory, ...]:
    parts = [module_memory(arch.name or arch.family, run.denoiser)]
    parts += [module_memory(spec.name, e) for spec, e in zip(_present(arch, run), [e for e in run.encoders if e])]
    if run.vae is not None:
        parts.append(module_memory("autoencoder", run.vae))
    if run.network is not None:
        parts.append(module_memory("network", run.network))
    return tuple(parts)


def _present(arch: Architecture, run: _Run) -> list:
    names = [n for n, e in zip(_ENCODER_ORDER[arch.family], run.encoders) if e is not None]
    specs = {spec.name: spec for spec in arch.text_encoders}
    return [specs[n] for n in names]


def _param_info(params: Sequence[nn.Parameter], run: _Run) -> list[TrainedParam]:
    return [TrainedParam(tuple(p.shape), p.dtype, id(p) in run.zero_init) for p in params]


def _nbytes(params: Sequence[nn.Parameter]) -> int:
    return sum(p.nbytes for p in params)


def _gradient_peaks(profile: ActivationProfile, options: MemoryOptions, grouped: list, outside: list,
                    optimizer: OptimizerMemory, run: _Run) -> tuple[int, int, int]:  # fmt: skip
    """(peak of forward + backward with the gradients made meanwhile, most gradient bytes at once, peak of the
    optimizer step after the backward; 0 where the optimizer steps during the backward)."""
    block_bytes = [[_nbytes(ps) for ps in blocks] for blocks in grouped]
    every = run.trainable
    total = _nbytes(every)
    if options.fused_backward_pass:
        largest = max((p.nbytes for p in every), default=0)
        return profile.peak(grads_kept=False, grads_before=largest + optimizer.step), largest, 0
    if options.blockwise_fused_optimizers:
        steps = [optimizer_memory(options.optimizer_type, options.optimizer_args, _param_info(ps, run)).step
                 for blocks in grouped for ps in blocks] + [optimizer.step if outside else 0]  # fmt: skip
        held = max((b for blocks in block_bytes for b in blocks), default=0) + _nbytes(outside)
        return profile.peak(block_bytes, grads_kept=False, grads_before=max(steps, default=0)), held, 0
    if options.gradient_accumulation_steps > 1:
        return profile.peak(block_bytes, grads_before=total), total, total + optimizer.step
    return profile.peak(block_bytes), total, total + optimizer.step


def _offloaded(profile: ActivationProfile) -> tuple[ActivationProfile, int]:
    """CPU-offloaded checkpoints: each block's kept inputs wait in RAM and come back for its recompute. Returns the
    profile on the GPU and the bytes in RAM."""
    blocks = tuple(tuple(dataclasses.replace(b, retained=0, backward_extra=b.backward_extra + b.retained)
                         for b in blocks) for blocks in profile.blocks)  # fmt: skip
    return ActivationProfile(profile.outer, blocks), sum(b.retained for blocks in profile.blocks for b in blocks)


def _encoding_peaks(arch: Architecture, run: _Run, options: MemoryOptions, target: str) -> tuple[int, int, int]:
    """(text encoders' peak, what a trained encoder's forward keeps for its backward, autoencoder encode peak)."""
    autocast = None if options.compute_dtype == torch.float32 else options.compute_dtype
    t5_tokens = arch.layout.t5_tokens(options.text_length)
    text_peak = text_saved = 0
    for encoder in run.encoders:
        if encoder is None:
            continue
        is_t5 = isinstance(encoder, T5EncoderModel)
        tokens = t5_tokens if is_t5 else CLIP_TOKENS
        trained = any(p.requires_grad for p in encoder.parameters()) or _adapted(encoder, run.network)

        def forward(encoder=encoder, tokens=tokens, is_t5=is_t5, trained=trained):
            ids = torch.zeros(options.batch_size, tokens, dtype=torch.long, device="meta")
            with torch.set_grad_enabled(trained):  # T5's padding mask is folded into its position bias: no extra
                return encoder(input_ids=ids, output_hidden_states=not is_t5)

        peak, saved = measure_forward(forward, compute_dtype=autocast, target=target)
        text_peak = max(text_peak, peak)
        text_saved += saved if trained else 0
    vae_peak = 0
    if run.vae is not None:
        width, height = options.resolution

        def encode():
            with torch.no_grad():
                x = torch.empty(options.batch_size, 3, height, width, dtype=options.compute_dtype, device="meta")
                return run.vae.encode(x)

        vae_peak, _ = measure_forward(encode, compute_dtype=None, target=target)
    return text_peak, text_saved, vae_peak


def _adapted(encoder: nn.Module, network: nn.Module | None) -> bool:
    if network is None:
        return False
    inside = {id(m) for m in encoder.modules()}
    return any(id(adapter.org_module) in inside and any(p.requires_grad for p in adapter.parameters())
               for adapter in network.adapters)  # fmt: skip


def _swap_table(arch: Architecture, run: _Run) -> tuple[tuple[int, int], ...]:
    layout = arch.layout
    table = []
    for n in range(layout.max_swap() + 1):
        groups = layout.swapped_groups(run.denoiser, n)
        table.append((swapped_weight_bytes([b for group in groups for b in group]), len(groups)))
    return tuple(table)


def _activations(arch: Architecture, run: _Run, options: MemoryOptions, optimizer: OptimizerMemory, target: str):
    """(profile, bytes of offloaded checkpoints, activation peak with gradients, most gradient bytes at once, peak
    of the optimizer step after the backward)."""
    layout = arch.layout
    width, height = options.resolution
    forward = layout.forward(run.denoiser, options.batch_size, width, height, layout.text_tokens(options.text_length),
                             options.compute_dtype, options.apply_t5_attn_mask)  # fmt: skip
    autocast = None if options.compute_dtype == torch.float32 else options.compute_dtype
    profile = measure_activations(run.denoiser, layout.lists, forward, trainable=run.trainable, compute_dtype=autocast,
                                  keep_grads=not options.fused_backward_pass, target=target)  # fmt: skip
    offloaded = 0
    if options.cpu_offload_checkpointing:
        profile, offloaded = _offloaded(profile)
    grouped, outside = _block_params(arch, run)
    return profile, offloaded, *_gradient_peaks(profile, options, grouped, outside, optimizer, run)


def _other_checkpointing(arch: Architecture, run: _Run, options: MemoryOptions, optimizer: OptimizerMemory,
                         target: str) -> int:  # fmt: skip
    """The activation peak with gradient checkpointing switched the other way (and no CPU offload)."""
    other = dataclasses.replace(options, gradient_checkpointing=not options.gradient_checkpointing,
                                cpu_offload_checkpointing=False)  # fmt: skip
    blocks = arch.layout.blocks(run.denoiser)
    switch, back = (disable_block_checkpointing, enable_block_checkpointing)
    if other.gradient_checkpointing:
        switch, back = back, switch
    switch(blocks)
    try:
        return _activations(arch, run, other, optimizer, target)[2]
    finally:
        back(blocks)


def estimate_memory(
    arch: Architecture, options: MemoryOptions, *, target: str = "cuda", compare_checkpointing: bool = False
) -> MemoryEstimate:
    """Estimate the memory of a training run with ``options`` on the models ``arch`` describes (see
    ``estimate_models.read_architecture``). ``compare_checkpointing`` also measures the activations with gradient
    checkpointing switched the other way, for the summary. ``target`` "cpu" runs CPU's attention kernel instead of
    the CUDA ones, to check the activation model against CPU runs (CUDA autocast is emulated whenever the compute
    dtype is not fp32)."""
    arch.layout.check_swap(options.blocks_to_swap, arch.name or arch.family)
    run = _build_run(arch, options)
    optimizer = optimizer_memory(options.optimizer_type, options.optimizer_args, _param_info(run.trainable, run),
                                 foreach=target == "cuda")  # fmt: skip
    profile, offloaded, activation_peak, gradients, step_peak = _activations(arch, run, options, optimizer, target)
    other = _other_checkpointing(arch, run, options, optimizer, target) if compare_checkpointing else None
    key = ("encoders", options.batch_size, options.resolution, options.text_length, options.apply_t5_attn_mask,
           options.compute_dtype, options.trains_text_encoder, repr(options.network), target)  # fmt: skip
    if key not in arch.measured:
        arch.measured[key] = _encoding_peaks(arch, run, options, target)
    text_peak, text_saved, vae_peak = arch.measured[key]
    components = _components(arch, run)
    on_gpu = {c.name: True for c in components}
    for spec in _present(arch, run):
        on_gpu[spec.name] = options.text_encoders_on_gpu
    if run.vae is not None:
        on_gpu["autoencoder"] = not options.cache_latents
    estimate = MemoryEstimate(
        architecture=arch.name or arch.family, options=dataclasses.replace(options, blocks_to_swap=0),
        components=components, on_gpu=on_gpu, trainable_params=sum(p.numel() for p in run.trainable),
        trained_weights=tensor_bytes(run.trainable), optimizer=optimizer, gradients=gradients, activations=profile,
        activation_peak=activation_peak + text_saved, encode_peak=max(text_peak, vae_peak),
        swap_table=_swap_table(arch, run), offloaded_checkpoints=offloaded, notes=_notes(options, optimizer),
        other_checkpointing_peak=None if other is None else other + text_saved,
    )  # fmt: skip
    phases = _phases(estimate, step_peak, text_peak, vae_peak)
    return dataclasses.replace(estimate, phases=phases).with_blocks_to_swap(options.blocks_to_swap)


def _phases(estimate: MemoryEstimate, step_peak: int, text_peak: int, vae_peak: int) -> dict[str, int]:
    """Peak VRAM at each moment that can be the highest (with no blocks swapped)."""
    o = estimate.options
    static = estimate.weights_on_gpu + estimate.optimizer.state
    phases = {"training step": static + max(estimate.activation_peak, step_peak)}
    live = max(0 if o.cache_text_encoder_outputs else text_peak, 0 if o.cache_latents else vae_peak)
    if live:
        phases["encoding"] = static + live
    cached = max(text_peak if o.cache_text_encoder_outputs else 0, vae_peak if o.cache_latents else 0)
    if cached:
        skipped = {"network"} if o.denoiser_loaded_while_caching else {"network", estimate.components[0].name}
        loaded = sum(c.total for c in estimate.components if c.name not in skipped)
        phases["caching"] = loaded + cached
    return phases


def _notes(options: MemoryOptions, optimizer: OptimizerMemory) -> tuple[str, ...]:
    notes = []
    if not optimizer.known:
        notes.append(f"{options.optimizer_type}: state layout unknown, assumed like AdamW")
    full = options.network is None
    if full and options.blocks_to_swap and not (options.fused_backward_pass or options.blockwise_fused_optimizers):
        notes.append("full fine-tuning with block swap needs --fused_backward_pass or --blockwise_fused_optimizers")
    return tuple(notes)


def smallest_swap_that_fits(estimate: MemoryEstimate, vram_budget_bytes: int) -> int | None:
    """``--blocks_to_swap auto``: the fewest blocks to swap for the peak to fit ``vram_budget_bytes``; None when
    even the most the model allows does not fit."""
    for n in range(estimate.max_blocks_to_swap + 1):
        if estimate.with_blocks_to_swap(n).fits(vram_budget_bytes):
            return n
    return None
