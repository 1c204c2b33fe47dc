"""Optimizers by --optimizer_type stepping a tiny model; lr schedules against their formulas; step-count parsing."""

from __future__ import annotations

import importlib.util
import logging
import math

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.training.lr_schedulers import build_lr_scheduler, resolve_step_count
from library.training.optimizers import (
    build_optimizer,
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_key_value_args,
    unwrap_optimizer,
)


def _problem(device: str = "cpu") -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A 64x64 linear regression (4096 weights: large enough for bitsandbytes' 8-bit states)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Linear(64, 64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(64, 64, generator=gen) * 0.1)
        model.bias.zero_()
    x = torch.randn(256, 64, generator=gen)
    y = x @ (torch.randn(64, 64, generator=gen) * 0.1).T
    return model.to(device), x.to(device), y.to(device)


def _train(optimizer_type: str, lr: float, args: list[str] | None = None, steps: int = 30, device: str = "cpu"):
    model, x, y = _problem(device)
    name, optimizer = build_optimizer(optimizer_type, model.parameters(), lr, args)
    before = model.weight.detach().clone()
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    optimizer_eval_mode(optimizer)
    final = nn.functional.mse_loss(model(x), y).item()
    return name, optimizer, losses[0], final, (model.weight.detach() - before).abs().max().item()


STEPPING = [
    ("AdamW", 1e-2, None, "torch.optim.adamw.AdamW"),
    ("", 1e-2, None, "torch.optim.adamw.AdamW"),
    (
        "adamw",
        1e-2,
        ["weight_decay=0.01", "betas=0.9,0.99"],
        "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))",
    ),
    ("SGDNesterov", 1e-2, None, "torch.optim.sgd.SGD(momentum=0.9)"),
    ("Lion", 1e-3, None, "lion_pytorch.lion_pytorch.Lion"),
    ("Prodigy", 1.0, ["d0=1e-3"], "prodigyopt.prodigy.Prodigy(d0=0.001)"),
    ("Adafactor", 1e-2, ["relative_step=False", "scale_parameter=False", "warmup_init=False"], "Adafactor("),
    ("adafactor", 1e-2, None, "Adafactor(relative_step=True)"),
    ("RAdamScheduleFree", 1e-2, None, "schedulefree.radam_schedulefree.RAdamScheduleFree"),
    ("AdamWScheduleFree", 1e-2, None, "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
    ("SGDScheduleFree", 1.0, None, "schedulefree.sgd_schedulefree.SGDScheduleFree"),
    ("torch.optim.RMSprop", 1e-3, ["alpha=0.9"], "torch.optim.rmsprop.RMSprop(alpha=0.9)"),
    ("Adagrad", 1e-1, None, "torch.optim.adagrad.Adagrad"),
]
BNB = ["AdamW8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "PagedLion8bit"]
BNB += ["AdEMAMix8bit", "PagedAdEMAMix8bit", "bitsandbytes.optim.AdEMAMix8bit"]


@pytest.mark.parametrize(("optimizer_type", "lr", "args", "description"), STEPPING)
def test_optimizer_steps_reduce_the_loss(optimizer_type, lr, args, description):
    name, _, first, final, change = _train(optimizer_type, lr, args)
    assert name.startswith(description) or description in name
    assert change > 0 and final < 0.9 * first


@pytest.mark.parametrize("optimizer_type", BNB)
def test_bitsandbytes_optimizers_step(optimizer_type):
    lr = 1e-3 if "lion" in optimizer_type.lower() else 1e-2
    name, optimizer, first, final, change = _train(optimizer_type, lr)
    assert name.startswith("bitsandbytes.optim.")
    assert change > 0 and final < 0.95 * first
    state_dtypes = {v.dtype for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)}
    assert (torch.uint8 in state_dtypes) == optimizer_type.endswith("8bit")


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer_type", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_bitsandbytes_optimizers_step_on_cuda(optimizer_type):
    lr = 1e-3 if "lion" in optimizer_type.lower() else 1e-2
    _, optimizer, first, final, change = _train(optimizer_type, lr, device="cuda")
    assert optimizer.state and change > 0 and final < 0.95 * first


def test_sgd_nesterov_rules():
    _, optimizer = build_optimizer("sgdnesterov", [nn.Parameter(torch.zeros(2))], 0.1, None)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    _, optimizer = build_optimizer("SGDNesterov", [nn.Parameter(torch.zeros(2))], 0.1, ["momentum=0.5"])
    assert optimizer.param_groups[0]["momentum"] == 0.5


def test_param_groups_keep_their_learning_rates():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    _, optimizer = build_optimizer("AdamW", [{"params": [a], "lr": 1e-3}, {"params": [b]}], 1e-4, None)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-4]


def test_adafactor_relative_step_drops_the_learning_rates(caplog):
    groups = [{"params": [nn.Parameter(torch.zeros(2))], "lr": 1e-3}]
    with caplog.at_level(logging.WARNING):
        name, optimizer = build_optimizer("Adafactor", groups, 1e-4, None)
    assert optimizer.defaults["relative_step"] and optimizer.param_groups[0]["lr"] is None
    assert name == "transformers.optimization.Adafactor(relative_step=True)"
    assert "ignored" in caplog.text


def test_adafactor_warmup_init_forces_relative_step():
    _, optimizer = build_optimizer(
        "Adafactor", [nn.Parameter(torch.zeros(2))], 1e-3, ["relative_step=False", "warmup_init=True"]
    )
    assert optimizer.defaults["relative_step"] and optimizer.defaults["lr"] is None
    _, optimizer = build_optimizer("Adafactor", [nn.Parameter(torch.zeros(2))], 1e-3, ["relative_step=False"])
    assert not optimizer.defaults["relative_step"] and optimizer.defaults["lr"] == 1e-3


def test_prodigy_warns_about_a_low_learning_rate(caplog):
    with caplog.at_level(logging.WARNING):
        build_optimizer("prodigy", [nn.Parameter(torch.zeros(2))], 1e-4, None)
    assert "about 1.0" in caplog.text


def test_schedule_free_modes():
    param = nn.Parameter(torch.ones(2))
    _, optimizer = build_optimizer("RAdamScheduleFree", [param], 1e-2, None)
    assert is_schedule_free(optimizer) and optimizer.param_groups[0]["train_mode"]
    optimizer_eval_mode(optimizer)
    assert not optimizer.param_groups[0]["train_mode"]
    param.grad = torch.ones(2)
    with pytest.raises(Exception, match="train mode"):
        optimizer.step()
    optimizer_train_mode(optimizer)
    optimizer.step()
    _, adamw = build_optimizer("AdamW", [nn.Parameter(torch.ones(2))], 1e-2, None)
    assert not is_schedule_free(adamw)
    optimizer_train_mode(adamw)
    optimizer_eval_mode(adamw)


def test_accelerate_wrapped_optimizers_are_seen_through():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    _, schedule_free = build_optimizer("AdamWScheduleFree", [nn.Parameter(torch.ones(2))], 1e-2, None)
    _, adamw = build_optimizer("AdamW", [nn.Parameter(torch.ones(2))], 1e-2, None)
    wrapped_sf, wrapped_adamw = accelerator.prepare_optimizer(schedule_free), accelerator.prepare_optimizer(adamw)
    assert unwrap_optimizer(wrapped_sf) is schedule_free and is_schedule_free(wrapped_sf)
    assert not is_schedule_free(wrapped_adamw)
    optimizer_eval_mode(wrapped_sf)
    assert not schedule_free.param_groups[0]["train_mode"]


def test_parse_optimizer_args_as_python_literals():
    entries = ["betas=0.9,0.999", "relative_step=False", "eps=1e-8", "d_coef=2", "name='x=y'", "growth=None"]
    assert parse_key_value_args(entries, "--optimizer_args") == {
        "betas": (0.9, 0.999),
        "relative_step": False,
        "eps": 1e-8,
        "d_coef": 2,
        "name": "x=y",
        "growth": None,
    }
    assert parse_key_value_args(None, "--optimizer_args") == {}


@pytest.mark.parametrize(
    ("optimizer_type", "args", "option"),
    [
        ("NoSuchOptimizer", None, "--optimizer_type"),
        ("nosuchmodule.Optim", None, "--optimizer_type"),
        ("torch.optim.NoSuch", None, "--optimizer_type"),
        ("AdamW", ["weight_decay"], "--optimizer_args"),
        ("AdamW", ["betas=(0.9"], "--optimizer_args"),
        ("AdamW", ["weight_decay=lots"], "--optimizer_args"),
        ("AdamW", ["foo=1"], "--optimizer_args"),
        ("AdamW", ["betas=2.0,0.9"], "--optimizer_args"),
    ],
)
def test_optimizer_errors_name_the_option(optimizer_type, args, option):
    with pytest.raises(UserError, match=option):
        build_optimizer(optimizer_type, [nn.Parameter(torch.zeros(2))], 1e-3, args)


@pytest.mark.skipif(importlib.util.find_spec("dadaptation") is not None, reason="dadaptation is installed")
def test_dadaptation_without_the_package_is_a_clear_error():
    with pytest.raises(UserError, match="DAdaptAdam needs the dadaptation package"):
        build_optimizer("DAdaptAdam", [nn.Parameter(torch.zeros(2))], 1.0, None)


# --- learning-rate schedules -----------------------------------------------------------------------------------


def _lrs(name: str, steps: list[int], optimizer_type: str = "SGD", total: int = 100, **options) -> list[float]:
    """The lr at each of ``steps`` (base lr 1.0, so the values are the schedule's factors)."""
    _, optimizer = build_optimizer(optimizer_type, [nn.Parameter(torch.zeros(2))], 1.0, None)
    scheduler = build_lr_scheduler(name, optimizer, num_training_steps=total, **options)
    values, current = [], 0
    for step in steps:
        for _ in range(step - current):
            optimizer.step()
            scheduler.step()
        current = step
        values.append(scheduler.get_last_lr()[0])
    return values


def _cos(progress: float, cycles: float = 0.5) -> float:
    return 0.5 * (1 + math.cos(math.pi * 2 * cycles * progress))


STEPS = [0, 5, 10, 40, 80, 90, 99]
SCHEDULES = [
    ("constant", {}, lambda s: 1.0),
    ("constant_with_warmup", {"num_warmup_steps": 10}, lambda s: min(s / 10, 1.0)),
    ("linear", {"num_warmup_steps": 10}, lambda s: s / 10 if s < 10 else (100 - s) / 90),
    ("cosine", {"num_warmup_steps": 10}, lambda s: s / 10 if s < 10 else _cos((s - 10) / 90)),
    (
        "cosine_with_restarts",
        {"num_warmup_steps": 10, "num_cycles": 3},
        lambda s: s / 10 if s < 10 else 0.5 * (1 + math.cos(math.pi * ((3 * (s - 10) / 90) % 1))),
    ),
    (
        "polynomial",
        {"num_warmup_steps": 10, "power": 2.0},
        lambda s: s / 10 if s < 10 else (1 - 1e-7) * (1 - (s - 10) / 90) ** 2 + 1e-7,
    ),
    ("inverse_sqrt", {"num_warmup_steps": 10}, lambda s: s / 10 if s < 10 else 1 / math.sqrt(s / 10)),
    (
        "inverse_sqrt",
        {"num_warmup_steps": 10, "timescale": 20},
        lambda s: s / 10 if s < 10 else 1 / math.sqrt((s + 10) / 20),
    ),
    (
        "cosine_with_min_lr",
        {"num_warmup_steps": 10, "min_lr_ratio": 0.1},
        lambda s: s / 10 if s < 10 else 0.1 + 0.9 * _cos((s - 10) / 90),
    ),
    (
        "warmup_stable_decay",
        {"num_warmup_steps": 10, "num_decay_steps": 20, "min_lr_ratio": 0.1},
        lambda s: 0.1 + 0.9 * s / 10 if s < 10 else 1.0 if s < 80 else 0.1 + 0.9 * _cos((s - 80) / 20),
    ),
    (
        "piecewise_constant",
        {"scheduler_args": ["step_rules='1:10,0.5:40,0.1'"]},
        lambda s: 1.0 if s < 10 else 0.5 if s < 40 else 0.1,
    ),
    (
        "torch.optim.lr_scheduler.StepLR",
        {"scheduler_args": ["step_size=40", "gamma=0.5"]},
        lambda s: 0.5 ** (s // 40),
    ),
    ("ExponentialLR", {"scheduler_args": ["gamma=0.99"]}, lambda s: 0.99**s),
]


@pytest.mark.parametrize(("name", "options", "formula"), SCHEDULES)
def test_schedule_matches_its_formula(name, options, formula):
    assert _lrs(name, STEPS, **options) == pytest.approx([formula(s) for s in STEPS], rel=1e-6, abs=1e-9)


def test_schedule_free_optimizers_get_a_constant_schedule(caplog):
    with caplog.at_level(logging.WARNING):
        lrs = _lrs("cosine", [0, 50, 99], optimizer_type="AdamWScheduleFree", num_warmup_steps=10)
    assert lrs == [1.0, 1.0, 1.0] and "ignored" in caplog.text


def test_adafactor_relative_step_uses_the_adafactor_schedule():
    model, x, y = _problem()
    _, optimizer = build_optimizer("Adafactor", model.parameters(), 1e-3, None)
    scheduler = build_lr_scheduler("constant", optimizer, num_training_steps=10)
    assert scheduler.get_last_lr() == [0.0]
    scheduler = build_lr_scheduler("adafactor:0.001", optimizer, num_training_steps=10)
    assert scheduler.get_last_lr() == [0.001]
    weight_rms = model.weight.detach().pow(2).mean().sqrt().item()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()
    # relative step at step 1: min(1e-2, 1/sqrt(1)) times the parameter scale max(1e-3, RMS(weight))
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * max(1e-3, weight_rms))


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("constant", {"num_warmup_steps": 5}, "--lr_warmup_steps"),
        (
            "torch.optim.lr_scheduler.StepLR",
            {"num_warmup_steps": 5, "scheduler_args": ["step_size=1"]},
            "--lr_warmup_steps",
        ),
        ("cosine_with_min_lr", {}, "--lr_scheduler_min_lr_ratio"),
        ("warmup_stable_decay", {"min_lr_ratio": 1.5}, "--lr_scheduler_min_lr_ratio"),
        ("warmup_stable_decay", {"num_warmup_steps": 60, "num_decay_steps": 50}, "--lr_decay_steps"),
        ("cosine_annealing", {}, "--lr_scheduler"),
        ("nosuchmodule.Scheduler", {}, "--lr_scheduler"),
        ("linear", {"scheduler_args": ["gamma=0.5"]}, "--lr_scheduler_args"),
        ("polynomial", {"scheduler_args": ["lr_end=2.0"]}, "--lr_scheduler_args"),
        ("adafactor", {}, "--optimizer_type Adafactor"),
    ],
)
def test_scheduler_errors_name_the_option(name, options, option):
    _, optimizer = build_optimizer("AdamW", [nn.Parameter(torch.zeros(2))], 1.0, None)
    with pytest.raises(UserError, match=option):
        build_lr_scheduler(name, optimizer, num_training_steps=100, **options)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("100", 100), (100, 100), ("0", 0), (0, 0), ("0.1", 100), (0.25, 250), ("10%", 100), ("2.5%", 25), ("1.0", 1)],
)
def test_resolve_step_count(value, expected):
    assert resolve_step_count(value, 1000) == expected


def test_resolve_step_count_rounds_ratios_down():
    assert resolve_step_count("0.999", 10) == 9


@pytest.mark.parametrize("value", ["1.5", "-1", "abc", "150%", True, -0.5])
def test_resolve_step_count_errors(value):
    with pytest.raises(UserError, match="--lr_decay_steps"):
        resolve_step_count(value, 1000, "--lr_decay_steps")
