"""The memory pre-flight against what the tiny models really use on CPU: weights of the models the loaders load,
trained weights, gradients after a real backward, optimizer state after a real step, the optimizer step and the
activations of a training step as the CPU allocator reports them (profiler allocation events), for several
shapes, batch sizes, with and without checkpointing. The GPU-only rules (attention kernels, autocast) are checked
against PyTorch's own lists and kernels' autograd."""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from library.memory.checkpointing import enable_block_checkpointing
from library.memory.estimate import (
    SWAP_STAGING_BYTES,
    MemoryEstimate,
    MemoryOptions,
    NetworkSettings,
    estimate_memory,
    smallest_swap_that_fits,
)
from library.memory.estimate_activations import (
    FP32_OPS,
    FP32_OUTPUT_OPS,
    LOWER_PRECISION_OPS,
    _CudaAutocast,
    measure_block,
)
from library.memory.estimate_fit import cannot_fit_message, fitting_options
from library.memory.estimate_models import Architecture, FluxLayout, SD3Layout, read_architecture
from library.memory.estimate_optimizer import TrainedParam, optimizer_memory
from library.models.autoencoder.loading import load_autoencoder
from library.models.flux.loading import load_flux_model
from library.models.flux.model import FluxParams
from library.models.flux.tiny import tiny_flux_params
from library.models.sd3.components import SD3TextSettings, load_sd3_text_encoder, resolve_sd3_files
from library.models.sd3.loading import load_sd3_mmdit, load_sd3_vae
from library.models.sd3.model import SD3_5_LARGE
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.t5 import load_t5_encoder
from library.training.optimizers import build_optimizer
from networks import lora_flux, lora_sd3

LORA = NetworkSettings("networks.lora_flux", dim=4, alpha=4.0, train_text_encoder=False)
CPU_RNG_STATE = torch.get_rng_state().numel()  # a checkpointed block keeps the CPU RNG state (a CPU tensor on GPUs)


def _bytes(tensors) -> dict[torch.dtype, int]:
    """Bytes per dtype, each distinct tensor once (by data pointer): the independent count."""
    seen = {}
    for t in tensors:
        seen[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
    out: dict[torch.dtype, int] = {}
    for (_, dtype), size in seen.items():
        out[dtype] = out.get(dtype, 0) + size
    return out


def _model_bytes(module: nn.Module) -> dict[torch.dtype, int]:
    return _bytes([*module.parameters(), *module.buffers()])


def _flux_arch(tiny_models) -> Architecture:
    return read_architecture("flux", tiny_models["flux_dev"], clip_l=str(tiny_models["clip_l"]),
                             t5xxl=str(tiny_models["t5xxl"]), vae=str(tiny_models["ae"]))  # fmt: skip


def _cpu(**kwargs) -> MemoryOptions:
    defaults = dict(compute_dtype=torch.float32, network=LORA, resolutions=((128, 128),), text_length=32,
                    cache_latents=True, cache_text_encoder_outputs=True)  # fmt: skip
    return MemoryOptions(**{**defaults, **kwargs})


def _allocations(fn, mark: str | None = None) -> tuple[int, int]:
    """(peak bytes, bytes allocated when the ``mark`` record starts) of ``fn()`` from the CPU allocator's events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, starts = [], []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            if node.name == mark:
                starts.append(node.start_time_ns)
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    at_mark = None
    for time, size in sorted(events):
        if starts and at_mark is None and time >= starts[0]:
            at_mark = live
        live += size
        peak = max(peak, live)
    return peak, at_mark if at_mark is not None else live


# --- weights -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,fp8", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)])
def test_flux_weights_equal_the_loaded_models(tiny_models, dtype, fp8):
    estimate = estimate_memory(_flux_arch(tiny_models), _cpu(compute_dtype=dtype, fp8_base=fp8), target="cpu")
    loaded = {
        "FLUX.1 dev": load_flux_model(tiny_models["flux_dev"], dtype=dtype, fp8_linear=fp8),
        "CLIP-L": load_clip_text_model(tiny_models["clip_l"], dtype=dtype),
        "T5-XXL": load_t5_encoder(tiny_models["t5xxl"], dtype=dtype),
        "autoencoder": load_autoencoder(tiny_models["ae"], dtype=dtype),
    }
    components = {c.name: c.by_dtype for c in estimate.components}
    for name, model in loaded.items():
        assert components[name] == _model_bytes(model), name
    if fp8:
        assert torch.float8_e4m3fn in components["FLUX.1 dev"]


@pytest.mark.parametrize("role", ["sd3_medium_incl_t5", "sd3_5_medium"])
def test_sd3_weights_equal_the_loaded_models(tiny_sd3_models, role):
    paths = tiny_sd3_models
    separate = {} if role == "sd3_medium_incl_t5" else {"clip_l": str(paths["clip_l"]), "clip_g": str(paths["clip_g"]),
                                                       "t5xxl": str(paths["t5xxl"])}  # fmt: skip
    arch = read_architecture("sd3", paths[role], **separate)
    options = _cpu(compute_dtype=torch.bfloat16, fp8_base=True, text_length=16,
                   network=NetworkSettings("networks.lora_sd3", 4, 4.0, train_text_encoder=False))  # fmt: skip
    estimate = estimate_memory(arch, options, target="cpu")
    files = resolve_sd3_files(paths[role], **separate)
    text = load_sd3_text_encoder(files, SD3TextSettings(), dtype=torch.bfloat16, device="cpu")
    loaded = {
        arch.name: load_sd3_mmdit(paths[role], dtype=torch.bfloat16, fp8_linear=True),
        "CLIP-L": text.clip_l, "CLIP-G": text.clip_g, "T5-XXL": text.t5,
        "autoencoder": load_sd3_vae(paths[role], dtype=torch.bfloat16),
    }  # fmt: skip
    components = {c.name: c.by_dtype for c in estimate.components}
    for name, model in loaded.items():
        assert components[name] == _model_bytes(model), name


# --- trained weights, gradients, optimizer ---------------------------------------------------------------------------


def _real_lora(tiny_models, network: NetworkSettings = LORA):
    flux = load_flux_model(tiny_models["flux_dev"], dtype=torch.float32)
    lora = lora_flux.create_network(1.0, network.dim, network.alpha, None, [None, None], flux, **network.args)
    lora.apply_to(None, flux, apply_text_encoder=False)
    lora.prepare_optimizer_params(None, None, 1e-4)
    return flux, lora


def _backward(model: nn.Module, options: MemoryOptions, arch: Architecture) -> None:
    layout = arch.layout
    width, height = options.resolution
    pred = layout.forward(model, options.batch_size, width, height, layout.text_tokens(options.text_length),
                          options.compute_dtype, options.apply_t5_attn_mask, device="cpu")()  # fmt: skip
    (pred.float() - torch.zeros_like(pred, dtype=torch.float32)).pow(2).mean().backward()


@pytest.mark.parametrize("args", [{}, {"train_blocks": "single", "split_qkv": "True"}])
def test_network_and_gradients_equal_a_real_backward(tiny_models, args):
    network = dataclasses.replace(LORA, args=args)
    arch = _flux_arch(tiny_models)
    options = _cpu(network=network)
    estimate = estimate_memory(arch, options, target="cpu")
    flux, lora = _real_lora(tiny_models, network)
    _backward(flux, options, arch)
    trained = [p for p in lora.parameters() if p.requires_grad]
    assert estimate.trainable_params == sum(p.numel() for p in trained)
    assert {c.name: c.by_dtype for c in estimate.components}["network"] == _model_bytes(lora)
    assert estimate.gradients == sum(_bytes([p.grad for p in trained]).values())


def test_full_finetuning_gradients_equal_a_real_backward(tiny_models):
    arch = _flux_arch(tiny_models)
    options = _cpu(network=None)
    estimate = estimate_memory(arch, options, target="cpu")
    flux = load_flux_model(tiny_models["flux_dev"], dtype=torch.float32).requires_grad_(True)
    _backward(flux, options, arch)
    assert estimate.gradients == sum(_bytes([p.grad for p in flux.parameters()]).values())
    assert estimate.trained_weights == _bytes(list(flux.parameters()))
    fused = estimate_memory(arch, dataclasses.replace(options, fused_backward_pass=True), target="cpu")
    assert fused.gradients == max(p.grad.numel() * 4 for p in flux.parameters())


OPTIMIZERS = [
    ("AdamW", []), ("AdamW", ["amsgrad=True"]), ("AdamW8bit", []), ("PagedAdamW8bit", []), ("Lion", []),
    ("Lion8bit", []), ("SGDNesterov", []), ("Adafactor", []), ("Adafactor", ["beta1=0.9", "relative_step=False"]),
    ("Prodigy", []), ("AdamWScheduleFree", []), ("SGDScheduleFree", []),
]  # fmt: skip


@pytest.fixture(scope="module")
def flux_and_lora(tiny_models):
    return _real_lora(tiny_models)


@pytest.mark.parametrize("optimizer_type,args", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_state_equals_a_real_optimizer_after_a_step(flux_and_lora, optimizer_type, args, dtype):
    """A LoRA network (zero-initialised ups, matrices above and below bitsandbytes' 4096-element threshold) and
    FLUX blocks fine-tuned (biases and norm scales too)."""
    flux, lora = copy.deepcopy(flux_and_lora)
    blocks = nn.ModuleList([flux.single_blocks[0], flux.final_layer]).requires_grad_(True)
    for module in (lora, blocks):
        params = [p for p in module.to(dtype).parameters() if p.requires_grad]
        zero = {id(p) for n, p in module.named_parameters() if "lora_up" in n}
        _, optimizer = build_optimizer(optimizer_type, params, 1e-3, args)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        rule = optimizer_memory(optimizer_type, args, [TrainedParam(tuple(p.shape), p.dtype, id(p) in zero)
                                                      for p in params])  # fmt: skip
        assert rule.known
        assert rule.state == sum(_bytes(state).values()), type(module).__name__


@pytest.mark.parametrize("optimizer_type,args", [("AdamW", ["foreach=True"]), ("Adafactor", []), ("Lion", [])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_step_memory_equals_the_measured_step(optimizer_type, args, dtype):
    """The second step (state exists): what it allocates above the state, measured; scalars aside (< 2 KiB)."""
    params = [nn.Parameter(torch.randn(64, 80, dtype=dtype)), nn.Parameter(torch.randn(80, dtype=dtype)),
              nn.Parameter(torch.randn(3, 70, 50, dtype=dtype))]  # fmt: skip
    _, optimizer = build_optimizer(optimizer_type, params, 1e-3, args)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    measured, _ = _allocations(optimizer.step)
    rule = optimizer_memory(optimizer_type, [a for a in args if not a.startswith("foreach")],
                            [TrainedParam(tuple(p.shape), p.dtype) for p in params], foreach=True)  # fmt: skip
    assert rule.step <= measured <= rule.step + 2048


def test_an_unknown_optimizer_is_assumed_like_adamw_and_says_so():
    rule = optimizer_memory("torch.optim.RMSprop", [], [TrainedParam((10, 10), torch.float32)])
    assert not rule.known and rule.state == 800


# --- activations ---------------------------------------------------------------------------------------------------


def _measured_step(model: nn.Module, options: MemoryOptions, arch: Architecture) -> tuple[int, int]:
    """(peak, allocated when the backward starts) of a real CPU training step, weights excluded."""

    def step():
        layout = arch.layout
        width, height = options.resolution
        pred = layout.forward(model, options.batch_size, width, height, layout.text_tokens(options.text_length),
                              options.compute_dtype, options.apply_t5_attn_mask, device="cpu")()  # fmt: skip
        loss = (pred.float() - torch.zeros_like(pred, dtype=torch.float32)).pow(2).mean()
        del pred
        with torch.profiler.record_function("backward"):
            loss.backward()

    return _allocations(step, "backward")


FLUX_STEPS = [
    dict(batch_size=1, resolutions=((128, 128),), text_length=16),
    dict(batch_size=2, resolutions=((192, 192), (128, 256)), text_length=24),
    dict(batch_size=3, resolutions=((128, 256),), text_length=8, apply_t5_attn_mask=True),
]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("step", FLUX_STEPS)
def test_flux_activations_equal_a_measured_cpu_step(tiny_models, step, checkpointing):
    arch = _flux_arch(tiny_models)
    options = _cpu(gradient_checkpointing=checkpointing, **step)
    estimate = estimate_memory(arch, options, target="cpu")
    flux, lora = _real_lora(tiny_models)
    if checkpointing:
        enable_block_checkpointing([*flux.double_blocks, *flux.single_blocks])
    peak, at_backward = _measured_step(flux, options, arch)
    rng = CPU_RNG_STATE * (len(flux.double_blocks) + len(flux.single_blocks)) if checkpointing else 0
    assert abs(estimate.activations.retained + rng - at_backward) <= 4096
    assert -4096 <= peak - estimate.activation_peak <= rng + 4096  # some RNG states are freed by the peak


@pytest.mark.parametrize("role", ["sd3_medium", "sd3_5_medium"])
def test_sd3_activations_equal_a_measured_cpu_step(tiny_sd3_models, role):
    """SD3.5 Medium: blocks with a second attention, then plain ones, then the pre-only last block."""
    arch = read_architecture("sd3", tiny_sd3_models[role], clip_l=str(tiny_sd3_models["clip_l"]),
                             clip_g=str(tiny_sd3_models["clip_g"]), t5xxl=str(tiny_sd3_models["t5xxl"]))  # fmt: skip
    network = NetworkSettings("networks.lora_sd3", 4, 4.0, train_text_encoder=False)
    options = _cpu(network=network, batch_size=2, resolutions=((128, 128),), text_length=24)
    estimate = estimate_memory(arch, options, target="cpu")
    mmdit = load_sd3_mmdit(tiny_sd3_models[role], dtype=torch.float32)
    lora = lora_sd3.create_network(1.0, 4, 4.0, None, [None, None, None], mmdit)
    lora.apply_to(None, mmdit, apply_text_encoder=False)
    lora.prepare_optimizer_params(None, None, 1e-4)
    peak, at_backward = _measured_step(mmdit, options, arch)
    assert abs(estimate.activations.retained - at_backward) <= 4096
    assert abs(estimate.activation_peak - peak) <= 4096


def test_a_block_keeps_what_autograd_saves(tiny_models):
    """The block measurement against the tensors autograd saves in a real CPU block (parameters and inputs the
    block shares with others excluded, its own stream inputs included)."""
    flux, lora = _real_lora(tiny_models)
    block = flux.double_blocks[1]
    img = torch.randn(2, 64, 256, requires_grad=True) * 1
    txt = torch.randn(2, 16, 256, requires_grad=True) * 1
    shared = dict(vec=torch.randn(2, 256), pe=flux.pe_embedder(torch.zeros(2, 80, 3)))
    excluded = {t.untyped_storage().data_ptr() for t in (*flux.parameters(), *lora.parameters(), *shared.values())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(img=img, txt=txt, **shared)
    meta_flux = FluxLayout(flux.params).build().requires_grad_(False)
    with torch.device("meta"):
        meta_lora = lora_flux.create_network(1.0, 4, 4.0, None, [None, None], meta_flux)
    meta_lora.apply_to(None, meta_flux, apply_text_encoder=False)
    recorded = {"img": _shape(img), "txt": _shape(txt), "attn_mask": None,
                **{k: v.to("meta") for k, v in shared.items()}}  # fmt: skip
    measured = measure_block(meta_flux.double_blocks[1], recorded, ("img", "txt"), _CudaAutocast(None, "cpu"),
                             list(meta_lora.parameters()), keep_grads=True)  # fmt: skip
    assert measured.retained == sum(saved.values())


def _shape(t: torch.Tensor):
    from library.memory.estimate_activations import _Shape

    return _Shape(t.shape, t.dtype, t.requires_grad)


def test_checkpointing_keeps_only_block_inputs(tiny_models):
    arch = _flux_arch(tiny_models)
    plain = estimate_memory(arch, _cpu(batch_size=2), target="cpu")
    checkpointed = estimate_memory(arch, _cpu(batch_size=2, gradient_checkpointing=True), target="cpu",
                                   compare_checkpointing=True)  # fmt: skip
    assert checkpointed.other_checkpointing_peak == plain.activation_peak
    assert "without gradient checkpointing" in checkpointed.format()
    for blocks in checkpointed.activations.blocks:
        for block in blocks:
            assert block.retained == block.stream  # its inputs, as large as its outputs
    assert checkpointed.activation_peak < plain.activation_peak
    offloaded = estimate_memory(arch, _cpu(batch_size=2, gradient_checkpointing=True, cpu_offload_checkpointing=True),
                                target="cpu")  # fmt: skip
    assert offloaded.ram_parts["offloaded checkpoints"] == sum(
        b.retained for blocks in checkpointed.activations.blocks for b in blocks
    )


# --- the GPU rules --------------------------------------------------------------------------------------------------


def _pytorch_cuda_autocast_lists() -> dict[str, set[str]]:
    """Op names of PyTorch's CUDA autocast test lists (``AutocastTestLists``), read from its source."""
    path = Path(torch.__file__).parent / "testing" / "_internal" / "autocast_test_lists.py"
    cuda = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and
                n.name == "AutocastTestLists")  # fmt: skip
    lists = {}
    for node in ast.walk(cuda):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            target = node.targets[0]
            if isinstance(target, ast.Attribute):
                lists[target.attr] = {e.elts[0].value for e in node.value.elts if isinstance(e, ast.Tuple)}
    return lists


def test_autocast_lists_are_pytorchs_cuda_lists():
    lists = _pytorch_cuda_autocast_lists()
    lower = set().union(*(lists[k] for k in ("torch_fp16", "nn_fp16", "linalg_fp16", "methods_fp16")))
    fp32 = set().union(*(lists[k] for k in ("torch_fp32", "nn_fp32", "methods_fp32")))
    aten_only = {
        "lstm_cell",
        "gru_cell",
        "rnn_tanh_cell",
        "rnn_relu_cell",
        "_convolution",
        "convolution",
        "cudnn_convolution",
        "cudnn_convolution_transpose",
        "nll_loss2d",
    }  # no model calls these
    assert lower and fp32
    assert lower - aten_only <= LOWER_PRECISION_OPS
    assert fp32 - aten_only <= FP32_OPS | FP32_OUTPUT_OPS


def _flux_block_memory(tokens: int, masked: bool, dtype=torch.bfloat16):
    params = tiny_flux_params(hidden_size=256)
    flux = FluxLayout(params).build().to(dtype).requires_grad_(False)
    with torch.device("meta"):
        lora = lora_flux.create_network(1.0, 4, 4.0, None, [None, None], flux)
    lora.apply_to(None, flux, apply_text_encoder=False)
    block = flux.single_blocks[1]
    x = torch.empty(1, tokens, 256, dtype=dtype, device="meta", requires_grad=True)
    pe = torch.empty(1, 1, tokens, 64, 2, 2, device="meta")
    mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool, device="meta") if masked else None
    recorded = dict(x=_shape(x), vec=torch.empty(1, 256, dtype=dtype, device="meta"), pe=pe, attn_mask=mask)
    return measure_block(block, recorded, ("x",), _CudaAutocast(dtype, "cuda"), list(lora.parameters()),
                         keep_grads=True)  # fmt: skip


@pytest.mark.parametrize("masked", [False, True])
def test_gpu_attention_keeps_no_scores(masked):
    """Flash (no mask) and memory-efficient (mask) attention keep q, k, v, the output and a log-sum-exp: the
    memory is linear in the tokens (a zero second difference), where the math path's B*H*L^2 scores are not."""
    sizes = [_flux_block_memory(tokens, masked) for tokens in (256, 512, 768)]
    for field in ("retained", "forward_extra", "backward_extra"):
        one, two, three = (getattr(m, field) for m in sizes)
        assert abs(three - 2 * two + one) <= 64, field  # the kernels' random seed and offset are a few bytes


def test_a_checkpointed_block_recomputes_under_autocast(tiny_models):
    """With bf16 autocast, the recompute in backward casts as the forward did (else checkpointing would refuse the
    differing saved tensors) and holds what the block without checkpointing keeps."""
    arch = _flux_arch(tiny_models)
    plain = estimate_memory(arch, _cpu(compute_dtype=torch.bfloat16), target="cuda")
    checkpointed = estimate_memory(arch, _cpu(compute_dtype=torch.bfloat16, gradient_checkpointing=True))
    for kept, recomputed in zip(plain.activations.blocks, checkpointed.activations.blocks):
        for block, again in zip(kept, recomputed):
            assert again.backward_extra >= block.retained


def test_autocast_runs_norms_in_fp32_and_matmuls_in_the_compute_dtype():
    with torch.device("meta"):
        norm, linear = nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 8).requires_grad_(True)
    x = torch.empty(2, 8, dtype=torch.bfloat16, device="meta")
    with _CudaAutocast(torch.bfloat16, "cuda"):
        normed = norm(x)
        out = linear(normed)
    assert normed.dtype == torch.float32 and out.dtype == torch.bfloat16


def test_fp8_base_without_checkpointing_keeps_upcast_weights(tiny_models):
    """An fp8 weight upcast for its layer is saved for the backward when the layer's input requires grad (all
    but the modulations, fed by the frozen vector embedders): without checkpointing those copies stay until the
    backward, as in a real run."""
    arch = _flux_arch(tiny_models)
    plain = estimate_memory(arch, _cpu(compute_dtype=torch.bfloat16), target="cuda")
    fp8 = estimate_memory(arch, _cpu(compute_dtype=torch.bfloat16, fp8_base=True), target="cuda")
    flux = FluxLayout(arch.denoiser).build()
    upcast = sum(m.weight.numel() * 2 for b in FluxLayout(arch.denoiser).blocks(flux) for n, m in b.named_modules()
                 if isinstance(m, nn.Linear) and not n.endswith(("mod.lin", "modulation.lin")))  # fmt: skip
    assert fp8.activations.retained - plain.activations.retained == upcast


# --- swap, fit and the message --------------------------------------------------------------------------------------


def test_block_swap_counts_follow_upstream():
    assert FluxLayout(FluxParams()).max_swap() == 35
    assert FluxLayout.split(35) == (17, 36) and FluxLayout.split(16) == (8, 16)
    assert SD3Layout(SD3_5_LARGE).max_swap() == 36


def _swappable() -> Architecture:
    return Architecture("flux", tiny_flux_params(hidden_size=128, depth=4, depth_single_blocks=6), name="FLUX test")


def test_swapped_blocks_move_their_weights_to_ram():
    arch = _swappable()
    estimate = estimate_memory(arch, _cpu(cache_latents=False), target="cpu")
    assert estimate.max_blocks_to_swap == 4  # double <= 2, single <= 4
    flux = FluxLayout(arch.denoiser).build()
    last = [*flux.double_blocks[-1:], *flux.single_blocks[-4:]]  # n = 3: 1 double, 2 * (3 - 1) single
    moved = sum(m.weight.numel() * 4 for b in last for m in b.modules() if isinstance(getattr(m, "weight", None),
                                                                                         torch.Tensor))  # fmt: skip
    swapped = estimate.with_blocks_to_swap(3)
    assert swapped.swap_saving == moved
    assert estimate.vram - swapped.vram == moved
    assert swapped.ram_parts["swapped blocks"] == moved
    assert swapped.ram_parts["pinned staging buffers"] == 2 * SWAP_STAGING_BYTES  # a double and a single offloader


def test_smallest_swap_that_fits():
    estimate = estimate_memory(_swappable(), _cpu(), target="cpu")
    peaks = [estimate.with_blocks_to_swap(n).vram for n in range(estimate.max_blocks_to_swap + 1)]
    assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]
    assert smallest_swap_that_fits(estimate, peaks[0]) == 0
    assert smallest_swap_that_fits(estimate, peaks[2]) == 2
    assert smallest_swap_that_fits(estimate, peaks[2] + 1) == 2
    assert smallest_swap_that_fits(estimate, peaks[-1] - 1) is None


def test_the_cannot_fit_message_names_options_that_fit():
    arch = _swappable()
    options = _cpu(batch_size=2, resolutions=((128, 128),), cache_latents=False, cache_text_encoder_outputs=False)
    base = estimate_memory(arch, options, target="cpu")
    checkpointed = estimate_memory(arch, dataclasses.replace(options, gradient_checkpointing=True), target="cpu")
    budget = (base.vram + checkpointed.vram) // 2
    message = cannot_fit_message(arch, options, budget, target="cpu")
    assert "exceeds" in message and "--gradient_checkpointing (" in message
    only_swap = base.with_blocks_to_swap(base.max_blocks_to_swap).vram
    fits = fitting_options(arch, options, only_swap, target="cpu")
    assert fits and all(e.fits(only_swap) for _, e in fits)
    assert fits[0][0] == f"--blocks_to_swap {base.max_blocks_to_swap}"
    assert all(dataclasses.replace(e.options, blocks_to_swap=0) != options for _, e in fits[1:])
    assert "no combination" in cannot_fit_message(arch, options, 1, target="cpu")


def test_format_names_every_part(tiny_models):
    estimate = estimate_memory(_flux_arch(tiny_models), _cpu(), target="cpu")
    text = estimate.format()
    for part in ("FLUX.1 dev", "CLIP-L", "T5-XXL", "autoencoder", "optimizer state", "gradients", "activations",
                 "peak VRAM"):  # fmt: skip
        assert part in text
    assert isinstance(estimate, MemoryEstimate)


def test_options_reject_conflicts():
    with pytest.raises(ValueError, match="cpu_offload_checkpointing"):
        MemoryOptions(cpu_offload_checkpointing=True)
    with pytest.raises(ValueError, match="exclude"):
        MemoryOptions(fused_backward_pass=True, blockwise_fused_optimizers=True)


def test_options_from_a_training_command_line():
    from library.training.families.flux import FLUX
    from library.training.network_training import build_network_parser

    args = build_network_parser(FLUX, "").parse_args(
        ["--network_module", "networks.lora_flux", "--network_dim", "8", "--network_args", "train_blocks=single",
         "--mixed_precision", "bf16", "--fp8_base", "--cpu_offload_checkpointing", "--cache_latents_to_disk",
         "--optimizer_type", "adafactor", "--t5xxl_max_token_length", "256", "--blocks_to_swap", "4",
         "--network_train_unet_only"]
    )  # fmt: skip
    options = MemoryOptions.from_args(args, [((768, 768), 2), ((1024, 1024), 1)])
    assert options.compute_dtype == torch.bfloat16 and options.fp8_base and options.trained_dtype == torch.float32
    assert options.network.module == "networks.lora_flux" and options.network.dim == 8
    assert options.network.args == {"train_blocks": "single"} and not options.network.train_text_encoder
    assert options.gradient_checkpointing and options.cpu_offload_checkpointing and options.cache_latents
    assert (options.resolution, options.batch_size) == ((768, 768), 2)  # the most pixels per batch
    assert (options.optimizer_type, options.text_length, options.blocks_to_swap) == ("adafactor", 256, 4)
