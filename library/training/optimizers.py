"""Optimizers by upstream's --optimizer_type names, with --optimizer_args parsed as Python literals."""

from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from library.errors import UserError

logger = logging.getLogger(__name__)

OPTION = "--optimizer_type"

# lower-cased --optimizer_type -> (module, class); the rules of the special ones live in build_optimizer
KNOWN_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw": ("torch.optim", "AdamW"),
    "sgdnesterov": ("torch.optim", "SGD"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit"),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW"),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit"),
    "ademamix8bit": ("bitsandbytes.optim", "AdEMAMix8bit"),
    "pagedademamix8bit": ("bitsandbytes.optim", "PagedAdEMAMix8bit"),
    "lion": ("lion_pytorch", "Lion"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
}
PIP_NAMES = {"lion_pytorch": "lion-pytorch", "dadaptation": "dadaptation", "schedulefree": "schedulefree"}


def parse_key_value_args(entries: Iterable[str] | None, option: str) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.999"]`` -> ``{"weight_decay": 0.01, "betas": (0.9, 0.999)}``.

    Values are Python literals (``ast.literal_eval``) as upstream: numbers, True/False/None, tuples, 'strings'.
    """
    kwargs: dict[str, Any] = {}
    for entry in entries or []:
        key, sep, text = entry.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{option}: expected key=value, got {entry!r}")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise UserError(
                f"{option}: value of {key!r} is not a Python literal: {text!r} (quote strings, e.g. {key}='text')"
            ) from None
    return kwargs


def _import_class(module_name: str, class_name: str, optimizer_type: str) -> type:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = PIP_NAMES.get(module_name.split(".")[0], module_name.split(".")[0])
        raise UserError(f"{OPTION} {optimizer_type} needs the {package} package (pip install {package})") from None
    if not hasattr(module, class_name):
        raise UserError(f"{OPTION} {optimizer_type}: {module_name} has no {class_name}")
    return getattr(module, class_name)


def resolve_optimizer_class(optimizer_type: str) -> type:
    """The class for an --optimizer_type: a known name (any case), ``module.Class``, or a torch.optim class name."""
    name = optimizer_type or "AdamW"
    if name.lower() in KNOWN_OPTIMIZERS:
        return _import_class(*KNOWN_OPTIMIZERS[name.lower()], name)
    if "." in name:
        module_name, _, class_name = name.rpartition(".")
        return _import_class(module_name, class_name, name)
    if isinstance(getattr(torch.optim, name, None), type):
        return getattr(torch.optim, name)
    known = "AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, SGDNesterov, Prodigy, Adafactor, RAdamScheduleFree, ..."
    raise UserError(f"{OPTION}: unknown optimizer {name!r}; use one of {known}, a torch.optim class or module.Class")


def _warn_adaptive_lr(lr: float, param_groups: list) -> None:
    group_lrs = {g.get("lr", lr) for g in param_groups if isinstance(g, dict)}
    first_lr = next((g["lr"] for g in param_groups if isinstance(g, dict) and "lr" in g), lr)
    if first_lr <= 0.1:
        logger.warning("learning rate %s is low for D-Adaptation/Prodigy; use about 1.0", first_lr)
    if len(group_lrs) > 1:
        logger.warning("D-Adaptation/Prodigy use one learning rate; only the first group's (%s) counts", first_lr)


def _adafactor_lr(lr: float, kwargs: dict[str, Any], param_groups: list) -> float | None:
    """Upstream's Adafactor rules: relative_step defaults to True (and warmup_init forces it); then the
    optimizer finds its own step size, so ``lr`` and the groups' lrs are dropped and None is returned."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; setting it")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return lr
    logger.warning(
        "Adafactor relative_step=True: --learning_rate %s is ignored; the lr scheduler becomes adafactor", lr
    )
    if any(isinstance(g, dict) and g.pop("lr", None) is not None for g in param_groups):
        logger.warning("Adafactor relative_step=True: per-group learning rates are ignored")
    return None


def _special_rules(key: str, lr: float, kwargs: dict[str, Any], param_groups: list) -> tuple[float | None, dict]:
    """Apply upstream's per-optimizer rules to ``kwargs``/``param_groups``.

    Returns the lr to construct with and fixed keyword arguments that are not the user's.
    """
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        if "momentum" not in kwargs:
            logger.info("SGD with Nesterov needs momentum; setting momentum=0.9")
            kwargs["momentum"] = 0.9
        return lr, {"nesterov": True}
    if key == "prodigy" or key.startswith("dadapt"):
        _warn_adaptive_lr(lr, param_groups)
    elif key == "adafactor":
        return _adafactor_lr(lr, kwargs, param_groups), {}
    return lr, {}


def build_optimizer(
    optimizer_type: str, param_groups: Iterable, lr: float, optimizer_args: list[str] | None
) -> tuple[str, Optimizer]:
    """Build the --optimizer_type optimizer over ``param_groups`` (parameters or dicts with "params"/"lr").

    Returns ``(description, optimizer)``; the description is upstream's ``ss_optimizer`` metadata value,
    ``module.Class(key=value,...)``. Schedule-free optimizers are returned in train mode.
    """
    kwargs = parse_key_value_args(optimizer_args, "--optimizer_args")
    cls = resolve_optimizer_class(optimizer_type)
    groups = list(param_groups)
    key = (optimizer_type or "AdamW").lower()
    construct_lr, fixed = _special_rules(key, lr, kwargs, groups)
    try:
        optimizer = cls(groups, lr=construct_lr, **fixed, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--optimizer_args {optimizer_args or []} rejected by {cls.__name__}: {e}") from None
    logger.info("optimizer %s.%s | %s", cls.__module__, cls.__name__, kwargs)
    optimizer_train_mode(optimizer)
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    description = f"{cls.__module__}.{cls.__name__}" + (f"({args_text})" if args_text else "")
    return description, optimizer


def unwrap_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer inside accelerate's (or DeepSpeed's) wrappers."""
    while isinstance(getattr(optimizer, "optimizer", None), Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def is_schedule_free(optimizer: Optimizer) -> bool:
    """True for optimizers with train/eval modes (schedulefree's), which keep their own lr schedule."""
    inner = unwrap_optimizer(optimizer)
    return callable(getattr(inner, "train", None)) and callable(getattr(inner, "eval", None))


def optimizer_train_mode(optimizer: Optimizer) -> None:
    """Put a schedule-free optimizer's parameters in training mode; a no-op for other optimizers."""
    if is_schedule_free(optimizer):
        unwrap_optimizer(optimizer).train()


def optimizer_eval_mode(optimizer: Optimizer) -> None:
    """Swap a schedule-free optimizer's averaged weights in for sampling, validation and saving; else a no-op."""
    if is_schedule_free(optimizer):
        unwrap_optimizer(optimizer).eval()
