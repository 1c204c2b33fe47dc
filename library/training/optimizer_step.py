"""How the loop turns a loss into updated weights: the optimizer-step plug.

- ``PlainStep``: backward, clip by the global norm, step, schedule, zero the gradients (the default).
- ``FusedBackwardStep`` (``--fused_backward_pass``): Adafactor steps each parameter inside backward as soon as its
  gradient is ready and frees that gradient at once, so about one parameter's gradient is alive at a time.
- ``BlockwiseStep`` (``--blockwise_fused_optimizers``): one optimizer of any type, with its own lr scheduler, per
  group of parameters (a block); a group steps as soon as all its gradients have arrived, then frees them.

The fused plugs clip each parameter's gradient by its own norm (as upstream): no global norm exists before the
first parameter steps. ``choose_optimizer_step`` holds the refusals; recipes call it before loading models, and
``build_optimizer_step`` makes the plug. Every plug restores Adafactor's state in fp32, so a resumed run continues
bit for bit (torch would cast the fp32 state of bf16 weights to bf16).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from enum import Enum
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from library.errors import UserError
from library.training.adafactor_fused import adafactor_step_param
from library.training.optimizers import (
    is_schedule_free,
    optimizer_eval_mode,
    optimizer_train_mode,
    resolve_optimizer_class,
    unwrap_optimizer,
)

logger = logging.getLogger(__name__)

FUSED = "--fused_backward_pass"
BLOCKWISE = "--blockwise_fused_optimizers"

OptimizerFactory = Callable[[list], tuple[str, Optimizer]]  # params or param groups -> (description, optimizer)
SchedulerFactory = Callable[[Optimizer], LRScheduler]


class StepKind(Enum):
    PLAIN = "plain"
    FUSED_BACKWARD = "fused backward pass"
    BLOCKWISE = "blockwise fused optimizers"


class OptimizerStep(Protocol):
    """What the loop needs from the optimizer side of training."""

    optimizer_name: str  # upstream's ss_optimizer value: module.Class(key=value,...)

    def step(self, accelerator: Accelerator, loss: Tensor, before_step: Callable[[], None]) -> None:
        """Backward, clipping, optimizer step(s), lr schedule(s) and freeing the gradients, inside the loop's
        ``accelerator.accumulate``. ``before_step`` runs once per optimizer step after backward (fused plugs: the
        gradients are already applied and freed by then)."""

    @property
    def lr(self) -> float:
        """The first group's learning rate, for the progress bar and logs."""

    def accelerate_objects(self) -> list:
        """The optimizers and schedulers accelerate saves and loads (in this order)."""

    def prepare(self, accelerator: Accelerator, module: torch.nn.Module | None = None,
                device_placement: bool = True) -> torch.nn.Module | None:  # fmt: skip
        """Register ``accelerate_objects()`` with accelerate (so save_state/load_state include them); with
        ``module``, prepare it in the same call and return it prepared."""

    def train_mode(self) -> None:
        """Schedule-free optimizers' training weights (before training steps); a no-op for others."""

    def eval_mode(self) -> None:
        """Schedule-free optimizers' averaged weights (for sampling, validation and saving); a no-op for others."""

    def advance_schedule(self, steps: int) -> None:
        """Step every lr scheduler ``steps`` times without training (``--initial_step``)."""

    def describe(self) -> str:
        """One phrase for the start-up summary, including how gradients are clipped."""


def choose_optimizer_step(
    *,
    fused_backward_pass: bool,
    blockwise_fused_optimizers: bool,
    optimizer_type: str | None,
    gradient_accumulation_steps: int,
    mixed_precision: str,
    num_processes: int,
    swaps_trained_blocks: bool = False,
) -> StepKind:
    """The plug the options ask for, or a UserError naming what they cannot do together. ``swaps_trained_blocks``:
    block swap moves weights that are trained (full fine-tuning), which only the fused plugs can update."""
    if fused_backward_pass and blockwise_fused_optimizers:
        raise UserError(f"{FUSED} and {BLOCKWISE} exclude each other; choose one")
    if not (fused_backward_pass or blockwise_fused_optimizers):
        if swaps_trained_blocks:
            raise UserError(f"--blocks_to_swap with full fine-tuning needs {FUSED} (Adafactor) or {BLOCKWISE}: a step "
                            "after backward would find swapped blocks' weights on the CPU and their gradients on the "
                            "accelerator")  # fmt: skip
        return StepKind.PLAIN
    flag = FUSED if fused_backward_pass else BLOCKWISE
    if num_processes > 1:
        raise UserError(f"{flag} steps parameters during backward, before the {num_processes} processes average "
                        "their gradients; train on one process or drop the option")  # fmt: skip
    if mixed_precision == "fp16":
        raise UserError(f"{flag} with --mixed_precision fp16: the fp16 loss scaler must check every gradient before "
                        "any step, which steps during backward cannot wait for; use --mixed_precision bf16")  # fmt: skip
    name = optimizer_type or "AdamW"
    cls = resolve_optimizer_class(name)
    if fused_backward_pass:
        from transformers.optimization import Adafactor

        if not issubclass(cls, Adafactor):
            raise UserError(f"{FUSED} works with --optimizer_type Adafactor only, got {name}; use Adafactor, or "
                            f"{BLOCKWISE} for other optimizers")  # fmt: skip
        if gradient_accumulation_steps > 1:
            raise UserError(f"{FUSED} applies each gradient as soon as it is computed, so it cannot accumulate "
                            f"gradients: set --gradient_accumulation_steps 1 (got {gradient_accumulation_steps})")  # fmt: skip
        return StepKind.FUSED_BACKWARD
    if callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None)):
        raise UserError(f"{BLOCKWISE} does not support the schedule-free optimizer {name} (its train/eval weight "
                        "switching is not done per block, as upstream); choose another --optimizer_type")  # fmt: skip
    return StepKind.BLOCKWISE


def build_optimizer_step(
    kind: StepKind,
    groups: Sequence[tuple[str, Sequence]],
    make_optimizer: OptimizerFactory,
    make_scheduler: SchedulerFactory,
    max_grad_norm: float,
) -> OptimizerStep:
    """The plug of ``kind`` over ``groups`` ([(name, parameters or param-group dicts), ...]).

    PLAIN and FUSED_BACKWARD make one optimizer over all groups; BLOCKWISE one per group with trainable parameters
    (each with its own scheduler). ``make_optimizer`` is e.g. ``build_optimizer`` with the options bound.
    """
    _check_disjoint(groups)
    if kind is StepKind.BLOCKWISE:
        kept = [(name, list(params)) for name, params in groups if _trainable(params)]
        built = [make_optimizer(params) for _, params in kept]
        optimizers = [optimizer for _, optimizer in built]
        schedulers = [make_scheduler(optimizer) for optimizer in optimizers]
        return BlockwiseStep([name for name, _ in kept], optimizers, schedulers, max_grad_norm, built[0][0])
    name, optimizer = make_optimizer([entry for _, params in groups for entry in params])
    scheduler = make_scheduler(optimizer)
    if kind is StepKind.FUSED_BACKWARD:
        return FusedBackwardStep(optimizer, scheduler, max_grad_norm, name)
    return PlainStep(optimizer, scheduler, max_grad_norm, name)


def _tensors(entries: Iterable) -> list[Tensor]:
    """The parameters in a list of parameters or param-group dicts."""
    out: list[Tensor] = []
    for entry in entries:
        if isinstance(entry, dict):
            out.extend(entry["params"])
        else:
            out.append(entry)
    return out


def _trainable(entries: Iterable) -> bool:
    return any(p.requires_grad for p in _tensors(entries))


def _check_disjoint(groups: Sequence[tuple[str, Sequence]]) -> None:
    seen: set[int] = set()
    for name, params in groups:
        for param in _tensors(params):
            if id(param) in seen:
                raise ValueError(f"parameter group {name!r} repeats a parameter of an earlier group")
            seen.add(id(param))


def _keep_adafactor_state_in_fp32(optimizer: Optimizer) -> None:
    """Make an Adafactor's ``load_state_dict`` keep its state as saved, in fp32: torch casts floating-point state
    to the parameter's dtype, which would round the state of bf16 weights on resume. (Other optimizers keep
    torch's rule: their state has the parameter's dtype anyway, and their steps need it to match.)"""
    from transformers.optimization import Adafactor

    if not isinstance(unwrap_optimizer(optimizer), Adafactor):
        return
    saved: dict[str, Any] = {}

    def remember(_optimizer: Optimizer, state_dict: dict) -> None:
        saved["state_dict"] = state_dict

    def restore(loaded: Optimizer) -> None:
        state_dict = saved.pop("state_dict", None)
        if state_dict is None:
            return
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in loaded.param_groups)
        by_id = dict(zip(ids, params))
        for param_id, values in state_dict["state"].items():
            param = by_id.get(param_id)
            for key, value in values.items():
                if param is not None and torch.is_tensor(value) and value.is_floating_point():
                    loaded.state[param][key] = value.to(device=param.device, copy=True)

    inner = unwrap_optimizer(optimizer)
    inner.register_load_state_dict_pre_hook(remember)
    inner.register_load_state_dict_post_hook(restore)


def _display_lr(optimizer: Optimizer, scheduler: LRScheduler) -> float:
    """The scheduler's last lr; for Adafactor with relative_step the step size it used (transformers'
    AdafactorSchedule reports it only while gradients exist, which fused steps have already freed)."""
    inner = unwrap_optimizer(optimizer)
    group = inner.param_groups[0]
    state = inner.state.get(group["params"][0]) if group.get("relative_step") else None
    if state and hasattr(inner, "_get_lr"):
        return float(inner._get_lr(group, state))
    return float(scheduler.get_last_lr()[0])


class _Schedules:
    """What every plug shares: its optimizers and their schedulers, accelerate registration and modes."""

    def __init__(self, optimizers: list[Optimizer], schedulers: list[LRScheduler], max_grad_norm: float,
                 optimizer_name: str):  # fmt: skip
        self.optimizers, self.schedulers = optimizers, schedulers
        self.max_grad_norm = max_grad_norm
        self.optimizer_name = optimizer_name
        for optimizer in optimizers:
            _keep_adafactor_state_in_fp32(optimizer)

    @property
    def lr(self) -> float:
        return _display_lr(self.optimizers[0], self.schedulers[0])

    def accelerate_objects(self) -> list:
        return [*self.optimizers, *self.schedulers]

    def prepare(self, accelerator: Accelerator, module: torch.nn.Module | None = None,
                device_placement: bool = True) -> torch.nn.Module | None:  # fmt: skip
        """Register the optimizers and schedulers; with ``module``, prepare it in the same call (DeepSpeed builds
        its engine from the model and its optimizer together) and return the prepared module."""
        objects = self.accelerate_objects()
        if module is None:
            prepared = accelerator.prepare(*objects)
        else:
            prepared = accelerator.prepare(module, *objects, device_placement=[device_placement] + [None] * len(objects))
            module, prepared = prepared[0], prepared[1:]
        n = len(self.optimizers)
        self.optimizers, self.schedulers = list(prepared[:n]), list(prepared[n:])
        return module

    def train_mode(self) -> None:
        for optimizer in self.optimizers:
            optimizer_train_mode(optimizer)

    def eval_mode(self) -> None:
        for optimizer in self.optimizers:
            optimizer_eval_mode(optimizer)

    def advance_schedule(self, steps: int) -> None:
        for scheduler in self.schedulers:
            for _ in range(steps):
                scheduler.step()


class PlainStep(_Schedules):
    """One optimizer stepped after backward; gradients clipped together by their global norm."""

    def __init__(self, optimizer: Optimizer, scheduler: LRScheduler, max_grad_norm: float, optimizer_name: str):
        super().__init__([optimizer], [scheduler], max_grad_norm, optimizer_name)
        self._clipped = [p for p in _tensors(optimizer.param_groups) if p.requires_grad]

    def step(self, accelerator: Accelerator, loss: Tensor, before_step: Callable[[], None]) -> None:
        optimizer, scheduler = self.optimizers[0], self.schedulers[0]
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            if self.max_grad_norm:
                accelerator.clip_grad_norm_(self._clipped, self.max_grad_norm)
            before_step()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def describe(self) -> str:
        clip = f"clipped to a global norm of {self.max_grad_norm:g}" if self.max_grad_norm else "not clipped"
        return f"optimizer step after backward, gradients {clip}"


class _HookedStep(_Schedules):
    """Plugs that act in per-parameter post-accumulate-grad hooks, only while their own ``step`` runs backward."""

    def __init__(self, optimizers: list[Optimizer], schedulers: list[LRScheduler], max_grad_norm: float,
                 optimizer_name: str):  # fmt: skip
        super().__init__(optimizers, schedulers, max_grad_norm, optimizer_name)
        self.hooked = [p for optimizer in optimizers for p in _tensors(optimizer.param_groups) if p.requires_grad]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.hooked]
        self._in_backward = False

    def _backward(self, accelerator: Accelerator, loss: Tensor) -> None:
        self._in_backward = accelerator.sync_gradients
        try:
            accelerator.backward(loss)
        finally:
            self._in_backward = False

    def _clip(self, param: Tensor) -> None:
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(param, self.max_grad_norm)

    def _on_gradient(self, param: Tensor) -> None:
        raise NotImplementedError

    def remove_hooks(self) -> None:
        """Detach from the parameters (their gradients then stay after backward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class FusedBackwardStep(_HookedStep):
    """Adafactor stepping each parameter in backward as soon as its gradient is ready, then freeing it."""

    def __init__(self, optimizer: Optimizer, scheduler: LRScheduler, max_grad_norm: float, optimizer_name: str):
        from transformers.optimization import Adafactor

        if not isinstance(unwrap_optimizer(optimizer), Adafactor):
            raise UserError(f"{FUSED} works with --optimizer_type Adafactor only, got {type(optimizer).__name__}")
        self._group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        super().__init__([optimizer], [scheduler], max_grad_norm, optimizer_name)

    def _on_gradient(self, param: Tensor) -> None:
        if not self._in_backward:
            return
        self._clip(param)
        adafactor_step_param(unwrap_optimizer(self.optimizers[0]), param, self._group_of[id(param)])
        param.grad = None

    def step(self, accelerator: Accelerator, loss: Tensor, before_step: Callable[[], None]) -> None:
        self._backward(accelerator, loss)
        if accelerator.sync_gradients:
            before_step()
            self.optimizers[0].step()  # finds no gradients left (a no-op); lets the scheduler see a step was made
            self.schedulers[0].step()

    def describe(self) -> str:
        rounding = "; bf16 weights written back with stochastic rounding" if any(
            p.dtype == torch.bfloat16 for p in self.hooked) else ""  # fmt: skip
        clip = f"clipped by its own norm to {self.max_grad_norm:g}" if self.max_grad_norm else "not clipped"
        return (f"{StepKind.FUSED_BACKWARD.value}: Adafactor steps each of {len(self.hooked)} parameters as soon as "
                f"its gradient is ready and frees the gradient; each gradient {clip}{rounding}")  # fmt: skip


class BlockwiseStep(_HookedStep):
    """One optimizer and scheduler per group; a group steps once all its trainable parameters have gradients."""

    def __init__(self, names: list[str], optimizers: list[Optimizer], schedulers: list[LRScheduler],
                 max_grad_norm: float, optimizer_name: str):  # fmt: skip
        for name, optimizer in zip(names, optimizers):
            if is_schedule_free(optimizer):
                raise UserError(f"{BLOCKWISE} does not support schedule-free optimizers ({name}: "
                                f"{type(unwrap_optimizer(optimizer)).__name__}); choose another --optimizer_type")  # fmt: skip
        self.names = names
        self.grouped = [[p for p in _tensors(o.param_groups) if p.requires_grad] for o in optimizers]
        self._owner = {id(p): i for i, params in enumerate(self.grouped) for p in params}
        self._arrived = [0] * len(optimizers)
        self._stepped = [False] * len(optimizers)
        super().__init__(optimizers, schedulers, max_grad_norm, optimizer_name)

    def _step_group(self, index: int) -> None:
        self.optimizers[index].step()
        self.optimizers[index].zero_grad(set_to_none=True)
        self._stepped[index] = True

    def _on_gradient(self, param: Tensor) -> None:
        if not self._in_backward:
            return  # accumulating: the gradients stay until the last micro-batch
        self._clip(param)
        index = self._owner[id(param)]
        self._arrived[index] += 1
        if self._arrived[index] == len(self.grouped[index]):
            self._step_group(index)

    def step(self, accelerator: Accelerator, loss: Tensor, before_step: Callable[[], None]) -> None:
        self._arrived = [0] * len(self.optimizers)
        self._stepped = [False] * len(self.optimizers)
        self._backward(accelerator, loss)
        if not accelerator.sync_gradients:
            return
        for index, params in enumerate(self.grouped):  # groups where some parameters got no gradient this step
            if not self._stepped[index] and any(p.grad is not None for p in params):
                self._step_group(index)
        before_step()
        for scheduler in self.schedulers:
            scheduler.step()

    def describe(self) -> str:
        shown = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
        clip = f"clipped by its own norm to {self.max_grad_norm:g}" if self.max_grad_norm else "not clipped"
        return (f"{StepKind.BLOCKWISE.value}: {len(self.optimizers)} optimizers ({shown}), each with its own lr "
                f"scheduler, stepping as soon as their group's gradients are ready; each gradient {clip}")  # fmt: skip
