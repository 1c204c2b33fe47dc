"""Learning-rate schedulers by upstream's --lr_scheduler names (transformers' and diffusers' schedules)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from library.errors import UserError
from library.training.optimizers import is_schedule_free, parse_key_value_args, unwrap_optimizer

logger = logging.getLogger(__name__)


def _hf():
    """transformers' schedules, imported when first needed: importing them pulls in peft and bitsandbytes."""
    from transformers import optimization

    return optimization

SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)


def resolve_step_count(value: str | float | int, total_steps: int, option: str = "--lr_warmup_steps") -> int:
    """Steps from a count (``"100"``, 100), a ratio of ``total_steps`` below 1 (``"0.1"``) or a percent (``"10%"``)."""
    if isinstance(value, bool):
        raise UserError(f"{option} must be a step count, a ratio or a percent, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise UserError(f"{option}: {text!r} is not a step count, a ratio (<1) or a percent (like 10%)") from None
        if text.endswith("%") and value > 1:
            raise UserError(f"{option}: {text} is more than 100%")
    if value < 0:
        raise UserError(f"{option} must be >= 0, got {value}")
    if value < 1:
        return int(value * total_steps)
    if value != int(value):
        raise UserError(f"{option}: {value} is neither a whole number of steps nor a ratio below 1")
    return int(value)


def _adafactor_relative_step(optimizer: Optimizer) -> bool:
    inner = unwrap_optimizer(optimizer)
    return isinstance(inner, _hf().Adafactor) and bool(inner.defaults.get("relative_step"))


def _no_warmup(name: str, num_warmup_steps: int) -> None:
    if num_warmup_steps:
        raise UserError(f"--lr_warmup_steps: the {name} lr scheduler has no warmup; set it to 0")


def _custom_scheduler(name: str, optimizer: Optimizer, kwargs: dict[str, Any]) -> LRScheduler:
    """``module.Class`` or a torch.optim.lr_scheduler class name, built with --lr_scheduler_args only."""
    module_name, _, class_name = name.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError:
        raise UserError(f"--lr_scheduler {name}: cannot import {module_name}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise UserError(
            f"--lr_scheduler: unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or module.Class"
        )
    return cls(optimizer, **kwargs)


def _adafactor_schedule(name: str, optimizer: Optimizer) -> LRScheduler:
    """Adafactor's own step size, reported as the lr; ``adafactor:<lr>`` gives the value shown before step 1."""
    if not isinstance(unwrap_optimizer(optimizer), _hf().Adafactor):
        raise UserError("--lr_scheduler adafactor needs --optimizer_type Adafactor")
    initial_lr = float(name.partition(":")[2] or 0.0)
    return _hf().AdafactorSchedule(unwrap_optimizer(optimizer), initial_lr)


def build_lr_scheduler(
    name: str,
    optimizer: Optimizer,
    *,
    num_training_steps: int,
    num_warmup_steps: int = 0,
    num_decay_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    min_lr_ratio: float | None = None,
    timescale: int | None = None,
    scheduler_args: list[str] | None = None,
) -> LRScheduler:
    """The --lr_scheduler schedule, with upstream's rules.

    ``name`` is a name from SCHEDULERS, ``adafactor:<lr>``, ``module.Class`` or a torch.optim.lr_scheduler class
    (pass --lr_scheduler_type here when it is set). Schedule-free optimizers get a constant schedule, and
    Adafactor with relative_step its own one, whatever the name.
    """
    kwargs = parse_key_value_args(scheduler_args, "--lr_scheduler_args")
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be > 0, got {num_training_steps}")
    if is_schedule_free(optimizer):
        if name != "constant":
            logger.warning("schedule-free optimizers keep their own schedule; --lr_scheduler %s is ignored", name)
        return LambdaLR(optimizer, lambda _: 1.0)
    if _adafactor_relative_step(optimizer) or name.startswith("adafactor"):
        if not name.startswith("adafactor"):
            logger.info("Adafactor with relative_step=True: using the adafactor lr scheduler instead of %s", name)
        _no_warmup("adafactor", num_warmup_steps)
        return _adafactor_schedule(name, optimizer)
    if name not in SCHEDULERS:
        _no_warmup(name, num_warmup_steps)
        return _call("--lr_scheduler_args", _custom_scheduler, name, optimizer, kwargs)
    steps = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    if name == "constant":
        _no_warmup(name, num_warmup_steps)
        return _call("--lr_scheduler_args", _hf().get_constant_schedule, optimizer, **kwargs)
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return _call("--lr_scheduler_args", get_piecewise_constant_schedule, optimizer, **kwargs)
    if name == "constant_with_warmup":
        return _call("--lr_scheduler_args", _hf().get_constant_schedule_with_warmup, optimizer, num_warmup_steps, **kwargs)
    if name == "inverse_sqrt":
        schedule_kwargs = {"num_warmup_steps": num_warmup_steps, "timescale": timescale}
        return _call("--lr_scheduler_args", _hf().get_inverse_sqrt_schedule, optimizer, **schedule_kwargs, **kwargs)
    return _decaying_scheduler(name, optimizer, steps, num_decay_steps, num_cycles, power, min_lr_ratio, kwargs)


def _decaying_scheduler(
    name: str,
    optimizer: Optimizer,
    steps: dict[str, int],
    num_decay_steps: int,
    num_cycles: int,
    power: float,
    min_lr_ratio: float | None,
    kwargs: dict[str, Any],
) -> LRScheduler:
    """Schedules that decay over ``num_training_steps``: linear, cosine(+restarts/min lr), polynomial, WSD."""
    if name == "linear":
        return _call("--lr_scheduler_args", _hf().get_linear_schedule_with_warmup, optimizer, **steps, **kwargs)
    if name == "cosine":
        return _call("--lr_scheduler_args", _hf().get_cosine_schedule_with_warmup, optimizer, **steps, **kwargs)
    if name == "cosine_with_restarts":
        fn = _hf().get_cosine_with_hard_restarts_schedule_with_warmup
        return _call("--lr_scheduler_args", fn, optimizer, **steps, num_cycles=num_cycles, **kwargs)
    if name == "polynomial":
        fn = _hf().get_polynomial_decay_schedule_with_warmup
        return _call("--lr_scheduler_args", fn, optimizer, **steps, power=power, **kwargs)
    if min_lr_ratio is not None and not 0 <= min_lr_ratio <= 1:
        raise UserError(f"--lr_scheduler_min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if name == "cosine_with_min_lr":
        if min_lr_ratio is None:
            raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")
        fn = _hf().get_cosine_with_min_lr_schedule_with_warmup
        schedule = {"num_cycles": num_cycles / 2, "min_lr_rate": min_lr_ratio}
        return _call("--lr_scheduler_args", fn, optimizer, **steps, **schedule, **kwargs)
    num_stable_steps = steps["num_training_steps"] - steps["num_warmup_steps"] - num_decay_steps
    if num_stable_steps < 0:
        raise UserError("--lr_warmup_steps plus --lr_decay_steps exceed the number of training steps")
    schedule = {
        "num_warmup_steps": steps["num_warmup_steps"],
        "num_stable_steps": num_stable_steps,
        "num_decay_steps": num_decay_steps,
        "num_cycles": num_cycles / 2,
        "min_lr_ratio": 0.0 if min_lr_ratio is None else min_lr_ratio,
    }
    return _call("--lr_scheduler_args", _hf().get_wsd_schedule, optimizer, **schedule, **kwargs)


def _call(option: str, fn: Any, *args: Any, **kwargs: Any) -> LRScheduler:
    """Call a scheduler factory; bad user keyword arguments become a UserError naming ``option``."""
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{option}: {e}") from None
