"""The optimizer-step plug: the per-parameter Adafactor step against transformers', per-parameter clipping,
gradients freed during backward, unbiased stochastic rounding, blockwise optimizers against one optimizer,
the refusals, and bit-exact resume through accelerate's save_state/load_state."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers.optimization import Adafactor

from library.errors import UserError
from library.training.adafactor_fused import adafactor_step_param
from library.training.lr_schedulers import build_lr_scheduler
from library.training.optimizer_step import (
    BlockwiseStep,
    FusedBackwardStep,
    PlainStep,
    StepKind,
    build_optimizer_step,
    choose_optimizer_step,
)
from library.training.optimizers import build_optimizer, unwrap_optimizer
from library.training.stochastic_rounding import copy_stochastic_

WIDTH = 6


def _stack(depth: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers).to(dtype)


def _blocks(model: nn.Module) -> list[tuple[str, list]]:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [(f"block {i}", list(m.parameters())) for i, m in enumerate(linears)]


def _batch(step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(1000 + step)).to(dtype)


def _loss(model: nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    first = next(model.parameters())
    return model(_batch(step, first.dtype)).float().square().mean() * scale


def _plug(kind: StepKind, model: nn.Module, optimizer_type: str = "AdamW", args: list[str] | None = None,
          max_grad_norm: float = 0.0, scheduler: str = "constant"):  # fmt: skip
    return build_optimizer_step(
        kind, _blocks(model), lambda params: build_optimizer(optimizer_type, params, 1e-2, args),
        lambda optimizer: build_lr_scheduler(scheduler, optimizer, num_training_steps=10), max_grad_norm,
    )  # fmt: skip


def _train(plug, model: nn.Module, accelerator: Accelerator, steps: range, scale: float = 1.0) -> None:
    for step in steps:
        with accelerator.accumulate(model):
            plug.step(accelerator, _loss(model, step, scale), lambda: None)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


ADAFACTOR_CONFIGS = [
    {},  # relative_step and scale_parameter, as transformers' defaults
    {"warmup_init": True},
    {"lr": 1e-2, "relative_step": False, "scale_parameter": False},
    {"lr": 1e-2, "relative_step": False, "beta1": 0.9, "weight_decay": 0.1},
    {"beta1": 0.8, "weight_decay": 0.01, "clip_threshold": 0.5, "decay_rate": -0.5},
]


@pytest.mark.parametrize("config", ADAFACTOR_CONFIGS)
def test_per_parameter_adafactor_equals_transformers_step(config):
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (7,), (2, 3, 4), (1,)]
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    ours_opt, theirs_opt = Adafactor(ours, **config), Adafactor(theirs, **config)
    for _ in range(4):
        grads = [torch.randn(s, generator=g) * 0.1 for s in shapes]
        for mine, reference, grad in zip(ours, theirs, grads):
            mine.grad, reference.grad = grad.clone(), grad.clone()
        theirs_opt.step()
        for param in ours:
            adafactor_step_param(ours_opt, param, ours_opt.param_groups[0])
    for mine, reference in zip(ours, theirs):
        assert (mine - reference).abs().max() <= 1e-6 * reference.abs().max()
        for key, value in theirs_opt.state[reference].items():
            if torch.is_tensor(value):
                assert torch.allclose(ours_opt.state[mine][key], value, rtol=1e-6, atol=0), key
            else:
                assert ours_opt.state[mine][key] == value


@pytest.mark.parametrize("args", [["relative_step=False"], None, ["beta1=0.9", "weight_decay=0.01"]])
def test_fused_backward_equals_plain_adafactor_without_clipping(args):
    accelerator = Accelerator(cpu=True)
    fused_model, plain_model = _stack(), _stack()
    fused = _plug(StepKind.FUSED_BACKWARD, fused_model, "Adafactor", args)
    plain = _plug(StepKind.PLAIN, plain_model, "Adafactor", args)
    _train(fused, fused_model, accelerator, range(3))
    _train(plain, plain_model, accelerator, range(3))
    for mine, reference in zip(fused_model.parameters(), plain_model.parameters()):
        assert (mine - reference).abs().max() <= 1e-6 * reference.abs().max()
        assert mine.grad is None


def test_fused_backward_clips_each_parameter_by_its_own_norm():
    accelerator = Accelerator(cpu=True)
    model, reference = _stack(), _stack()
    fused = _plug(StepKind.FUSED_BACKWARD, model, "Adafactor", ["relative_step=False"], max_grad_norm=0.05)
    optimizer = Adafactor(reference.parameters(), lr=1e-2, relative_step=False)
    clipped = 0
    for step in range(3):
        _train(fused, model, accelerator, [step], scale=50.0)
        _loss(reference, step, 50.0).backward()
        for param in reference.parameters():
            norm = param.grad.norm().item()
            clipped += norm > 0.05
            param.grad.mul_(min(1.0, 0.05 / (norm + 1e-6)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert clipped >= 6  # clipping really acted
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert (mine - theirs).abs().max() <= 1e-6 * theirs.abs().max()


def _peak_live_gradients(kind: StepKind) -> tuple[int, nn.Module]:
    model = _stack(depth=6)
    params = list(model.parameters())
    peak = [0]

    def observe(_param):
        peak[0] = max(peak[0], sum(p.grad is not None for p in params))

    for param in params:  # registered before the plug's hooks, so each sees its own gradient
        param.register_post_accumulate_grad_hook(observe)
    plug = _plug(kind, model, "Adafactor", ["relative_step=False"])
    plug.step(Accelerator(cpu=True), _loss(model, 0), lambda: None)
    return peak[0], model


def test_gradients_are_freed_during_backward():
    fused_peak, fused_model = _peak_live_gradients(StepKind.FUSED_BACKWARD)
    blockwise_peak, blockwise_model = _peak_live_gradients(StepKind.BLOCKWISE)
    plain_peak, _ = _peak_live_gradients(StepKind.PLAIN)
    assert (fused_peak, blockwise_peak, plain_peak) == (1, 2, 12)  # one parameter, one block (weight+bias), all
    assert all(p.grad is None for p in [*fused_model.parameters(), *blockwise_model.parameters()])


def test_hooks_only_act_inside_the_plugs_step():
    model = _stack()
    plug = _plug(StepKind.FUSED_BACKWARD, model, "Adafactor", ["relative_step=False"])
    before = _params(model)
    _loss(model, 0).backward()  # e.g. someone else's backward: gradients stay, nothing steps
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plug.remove_hooks()
    model.zero_grad(set_to_none=True)
    plug.step(Accelerator(cpu=True), _loss(model, 0), lambda: None)
    assert all(p.grad is not None for p in model.parameters())


def _bf16_neighbours(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above (in magnitude) each fp32 value, as float64."""
    bits = values.view(torch.int32)
    low = (bits & -65536).view(torch.float32)
    high = ((bits & -65536) + 65536).view(torch.float32)
    return low.double(), high.double()


def test_stochastic_rounding_is_unbiased_and_exact_on_bf16_values():
    draws = 4096
    bases = torch.tensor([1.0, -3.0, 1e-3, 7.5e4], dtype=torch.bfloat16).float()
    lower, upper = _bf16_neighbours(bases)
    fractions = torch.tensor([0.1, 0.37, 0.5, 0.93], dtype=torch.float64)
    values = (lower[:, None] + fractions * (upper - lower)[:, None]).float().flatten()
    rounded = torch.empty(draws, len(values), dtype=torch.bfloat16)
    copy_stochastic_(rounded, values.repeat(draws, 1), generator=torch.Generator().manual_seed(0))
    below, above = _bf16_neighbours(values)
    result = rounded.double()
    assert bool(((result == below) | (result == above)).all())
    p = (values.double() - below) / (above - below)
    assert bool(((p > 0.05) & (p < 0.95)).all())  # strictly between two bf16 neighbours
    std_of_mean = (above - below).abs() * torch.sqrt(p * (1 - p) / draws)
    assert bool(((result.mean(0) - values.double()).abs() <= 5 * std_of_mean).all())
    exact = torch.tensor([1.0, -2.5, 0.0, 3.140625, 1e-3], dtype=torch.bfloat16).float()
    out = torch.empty_like(exact, dtype=torch.bfloat16)
    for seed in range(5):
        copy_stochastic_(out, exact, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.float(), exact)


def test_bf16_weights_are_written_back_with_stochastic_rounding():
    g = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 64, generator=g).to(torch.bfloat16))
    grad = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    shadow = nn.Parameter(weight.detach().float())
    shadow.grad = grad.float()
    Adafactor([shadow], lr=1e-3, relative_step=False, scale_parameter=False).step()
    weight.grad = grad
    optimizer = Adafactor([weight], lr=1e-3, relative_step=False, scale_parameter=False)
    torch.manual_seed(0)
    adafactor_step_param(optimizer, weight, optimizer.param_groups[0])
    below, above = _bf16_neighbours(shadow.detach())
    result = weight.detach().double()
    assert bool(((result == below) | (result == above)).all())
    nearest = shadow.detach().to(torch.bfloat16).double()
    assert (result != nearest).float().mean() > 0.05  # not round-to-nearest
    assert optimizer.state[weight]["exp_avg_sq_row"].dtype == torch.float32


def test_blockwise_adamw_equals_one_adamw_and_schedules_each_group():
    accelerator = Accelerator(cpu=True)
    model, reference = _stack(), _stack()
    blockwise = _plug(StepKind.BLOCKWISE, model, scheduler="linear")
    plain = _plug(StepKind.PLAIN, reference, scheduler="linear")
    assert isinstance(blockwise, BlockwiseStep) and len(blockwise.optimizers) == 4
    _train(blockwise, model, accelerator, range(4))
    _train(plain, reference, accelerator, range(4))
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert (mine - theirs).abs().max() <= 1e-6 * theirs.abs().max()
    assert [s.last_epoch for s in blockwise.schedulers] == [4] * 4
    assert blockwise.lr == pytest.approx(plain.lr) == pytest.approx(1e-2 * 6 / 10)


def test_blockwise_accumulates_until_the_last_micro_batch():
    model, reference = _stack(), _stack()
    blockwise = _plug(StepKind.BLOCKWISE, model)
    plain = _plug(StepKind.PLAIN, reference)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    plain.prepare(accelerator)  # today's path: accelerate's wrappers skip steps until the last micro-batch
    _train(plain, reference, accelerator, range(4))
    _train(blockwise, model, accelerator, range(4))  # unwrapped: the plug itself waits for the last micro-batch
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert (mine - theirs).abs().max() <= 1e-6 * theirs.abs().max()
    assert [s.last_epoch for s in blockwise.schedulers] == [2] * 4
    Accelerator(cpu=True)  # back to no accumulation for later tests


def test_blockwise_steps_a_group_whose_parameters_did_not_all_get_gradients():
    model = _stack(depth=2)
    unused = nn.Linear(WIDTH, WIDTH)
    groups = [("block 0", [*model[0].parameters(), *unused.parameters()]), ("block 1", list(model[2].parameters()))]
    plug = build_optimizer_step(StepKind.BLOCKWISE, groups, lambda ps: build_optimizer("AdamW", ps, 1e-2, None),
                                lambda o: build_lr_scheduler("constant", o, num_training_steps=5), 0.0)  # fmt: skip
    before = _params(model)
    plug.step(Accelerator(cpu=True), _loss(model, 0), lambda: None)
    assert all(not torch.equal(a, b) and b.grad is None for a, b in zip(before, model.parameters()))


def test_fused_lr_is_adafactors_relative_step_size():
    accelerator = Accelerator(cpu=True)
    model, reference = _stack(), _stack()
    fused = _plug(StepKind.FUSED_BACKWARD, model, "Adafactor", scheduler="adafactor")
    plain = _plug(StepKind.PLAIN, reference, "Adafactor", scheduler="adafactor")
    _train(fused, model, accelerator, range(2))
    _train(plain, reference, accelerator, range(2))
    reported = float(plain.schedulers[0].get_last_lr()[0])  # transformers' AdafactorSchedule, gradients present
    assert reported > 0 and fused.lr == pytest.approx(reported, rel=1e-6)


def test_describe_names_the_clipping():
    model = _stack()
    assert "global norm of 1" in _plug(StepKind.PLAIN, model, max_grad_norm=1.0).describe()
    fused = _plug(StepKind.FUSED_BACKWARD, _stack(dtype=torch.bfloat16), "Adafactor", max_grad_norm=0.5)
    assert isinstance(fused, FusedBackwardStep)
    assert "own norm to 0.5" in fused.describe() and "stochastic rounding" in fused.describe()
    assert "4 optimizers (block 0, block 1, block 2, ...)" in _plug(StepKind.BLOCKWISE, _stack()).describe()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fused_backward_pass": True, "blockwise_fused_optimizers": True}, "exclude each other"),
        ({"fused_backward_pass": True, "optimizer_type": "AdamW"}, "works with --optimizer_type Adafactor only"),
        ({"fused_backward_pass": True, "gradient_accumulation_steps": 4}, "set --gradient_accumulation_steps 1"),
        ({"blockwise_fused_optimizers": True, "optimizer_type": "RAdamScheduleFree"}, "schedule-free"),
        ({"blockwise_fused_optimizers": True, "optimizer_type": "AdamW", "num_processes": 2}, "one process"),
        ({"fused_backward_pass": True, "mixed_precision": "fp16"}, "use --mixed_precision bf16"),
        ({"optimizer_type": "AdamW", "swaps_trained_blocks": True}, "--blocks_to_swap with full fine-tuning needs"),
    ],
)
def test_refusals(options, message):
    settings = {"fused_backward_pass": False, "blockwise_fused_optimizers": False, "optimizer_type": "Adafactor",
                "gradient_accumulation_steps": 1, "mixed_precision": "bf16", "num_processes": 1, **options}  # fmt: skip
    with pytest.raises(UserError, match=message) as error:
        choose_optimizer_step(**settings)
    assert "\n" not in str(error.value)


def test_accepted_choices():
    common = {"gradient_accumulation_steps": 1, "mixed_precision": "bf16", "num_processes": 1}
    assert choose_optimizer_step(fused_backward_pass=False, blockwise_fused_optimizers=False, optimizer_type=None,
                                 **{**common, "gradient_accumulation_steps": 8, "num_processes": 4}) is StepKind.PLAIN  # fmt: skip
    assert choose_optimizer_step(fused_backward_pass=True, blockwise_fused_optimizers=False,
                                 optimizer_type="adafactor", **common) is StepKind.FUSED_BACKWARD  # fmt: skip
    assert choose_optimizer_step(fused_backward_pass=False, blockwise_fused_optimizers=True, optimizer_type="Adafactor",
                                 swaps_trained_blocks=True, **common) is StepKind.BLOCKWISE  # fmt: skip


def test_blockwise_refuses_a_schedule_free_optimizer_it_is_given():
    with pytest.raises(UserError, match="schedule-free"):
        _plug(StepKind.BLOCKWISE, _stack(), "AdamWScheduleFree")


RESUME_CASES = [
    (StepKind.FUSED_BACKWARD, torch.bfloat16, "Adafactor", ["relative_step=False"], 0.05),
    (StepKind.FUSED_BACKWARD, torch.float32, "Adafactor", ["beta1=0.9"], 0.0),
    (StepKind.BLOCKWISE, torch.float32, "AdamW", None, 0.05),
    (StepKind.PLAIN, torch.bfloat16, "Adafactor", ["relative_step=False"], 1.0),
]


def _resumable_run(kind, dtype, optimizer_type, args, max_grad_norm, seed):
    accelerator = Accelerator(cpu=True)
    model = _stack(seed=seed, dtype=dtype)
    plug = _plug(kind, model, optimizer_type, args, max_grad_norm, scheduler="cosine")
    model = accelerator.prepare(model)
    plug.prepare(accelerator)
    return accelerator, model, plug


@pytest.mark.parametrize(("kind", "dtype", "optimizer_type", "args", "max_grad_norm"), RESUME_CASES)
def test_resume_continues_bit_for_bit(tmp_path, kind, dtype, optimizer_type, args, max_grad_norm):
    setup = (kind, dtype, optimizer_type, args, max_grad_norm)
    accelerator, model, plug = _resumable_run(*setup, seed=0)
    torch.manual_seed(7)
    _train(plug, model, accelerator, range(3), scale=20.0)
    accelerator.save_state(str(tmp_path / "state"))
    _train(plug, model, accelerator, range(3, 6), scale=20.0)
    uninterrupted = _params(model)

    accelerator, model, plug = _resumable_run(*setup, seed=1)
    torch.manual_seed(99)
    accelerator.load_state(str(tmp_path / "state"))
    if optimizer_type == "Adafactor":  # its state stays fp32 for bf16 weights (torch would cast it to bf16)
        state = unwrap_optimizer(plug.optimizers[0]).state
        assert {v.dtype for s in state.values() for v in s.values() if torch.is_tensor(v)} == {torch.float32}
    _train(plug, model, accelerator, range(3, 6), scale=20.0)
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))
    assert plug.schedulers[0].scheduler.last_epoch == 6


def test_advance_schedule_steps_every_scheduler():
    plug = _plug(StepKind.BLOCKWISE, _stack(), scheduler="linear")
    plug.advance_schedule(3)
    assert [s.last_epoch for s in plug.schedulers] == [3] * 4
    assert plug.lr == pytest.approx(1e-2 * 7 / 10)


def test_plain_step_keeps_todays_order(monkeypatch):
    model = _stack()
    plug = _plug(StepKind.PLAIN, model, max_grad_norm=1.0)
    assert isinstance(plug, PlainStep)
    calls = []
    accelerator = Accelerator(cpu=True)
    monkeypatch.setattr(accelerator, "clip_grad_norm_", lambda params, norm: calls.append(("clip", len(params), norm)))
    for name in ("step", "zero_grad"):
        original = getattr(plug.optimizers[0], name)
        monkeypatch.setattr(
            plug.optimizers[0], name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))
        )
    original_schedule = plug.schedulers[0].step
    monkeypatch.setattr(plug.schedulers[0], "step", lambda: (calls.append("schedule"), original_schedule()))
    plug.step(accelerator, _loss(model, 0), lambda: calls.append("before_step"))
    assert calls == [("clip", 8, 1.0), "before_step", "step", "schedule", "zero_grad"]
    assert model[0].weight.grad is None
