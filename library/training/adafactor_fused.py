"""Adafactor applied to one parameter at a time, for the fused backward pass (``--fused_backward_pass``).

The maths is transformers' ``Adafactor.step`` (Shazeer & Stern 2018) for one parameter p with gradient g, at step t:

- step size: rho = min(1e-6 t if warmup_init else 1e-2, 1/sqrt(t)) with relative_step, else the group's lr;
  times max(eps2, RMS(p)) with scale_parameter;
- second moment, with beta2 = 1 - t^decay_rate and G = g^2 + eps1: for tensors of 2+ dims two factored moving
  averages R <- beta2 R + (1-beta2) mean_cols(G), C <- beta2 C + (1-beta2) mean_rows(G), and
  V = (R / mean(R)) C; else V <- beta2 V + (1-beta2) G;
- update u = g / sqrt(V), divided by max(1, RMS(u) / clip_threshold), times the step size; with beta1 the update
  is the moving average m <- beta1 m + (1-beta1) u;
- p <- p - weight_decay * step size * p - u (decoupled weight decay).

The state sits in the optimizer's ``state`` under transformers' keys (a run can resume with or without the fused
pass), in fp32 on the gradient's device. bf16 weights are updated in fp32 and written back with stochastic rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from library.training.stochastic_rounding import copy_stochastic_


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _step_size(group: dict, state: dict) -> Tensor | float:
    relative = group["lr"]
    if group["relative_step"]:
        floor = 1e-6 * state["step"] if group["warmup_init"] else 1e-2
        relative = min(floor, 1.0 / math.sqrt(state["step"]))
    scale = max(group["eps"][1], state["RMS"]) if group["scale_parameter"] else 1.0
    return scale * relative


def _init_state(state: dict, group: dict, grad: Tensor) -> None:
    """Create the state on the first step; later, move it to the gradient's device in fp32."""
    factored = grad.dim() >= 2
    if not state:
        state["step"] = 0
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad)
        if factored:
            state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
            state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["RMS"] = 0
        return
    for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        if key in state:
            state[key] = state[key].to(grad)


def _normalized_gradient(state: dict, group: dict, grad: Tensor) -> Tensor:
    """g / sqrt(V) after updating the second-moment averages (factored for tensors of 2+ dims)."""
    beta2 = 1.0 - math.pow(state["step"], group["decay_rate"])
    squared = grad**2 + group["eps"][0]
    if grad.dim() < 2:
        second = state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1.0 - beta2)
        return second.rsqrt().mul_(grad)
    row = state["exp_avg_sq_row"].mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
    col = state["exp_avg_sq_col"].mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return torch.mul(row_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)


@torch.no_grad()
def adafactor_step_param(optimizer: Optimizer, param: Tensor, group: dict) -> None:
    """One Adafactor step for ``param`` (of ``group``, one of ``optimizer``'s param groups) from its ``.grad``.

    A parameter without a gradient is left alone. The parameter may live on another device than its gradient
    (block swap); the work is done where the gradient is.
    """
    if param.grad is None:
        return
    if param.grad.is_sparse:
        raise RuntimeError("Adafactor does not support sparse gradients")
    grad = param.grad.float()
    state = optimizer.state[param]
    _init_state(state, group, grad)
    in_place = param.dtype == torch.float32 and param.device == grad.device
    weights = param if in_place else param.to(device=grad.device, dtype=torch.float32)

    state["step"] += 1
    state["RMS"] = _rms(weights)
    step_size = _step_size(group, state)
    update = _normalized_gradient(state, group, grad)
    update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
    update.mul_(step_size)
    if group["beta1"] is not None:
        update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
    if group["weight_decay"] != 0:
        weights.add_(weights, alpha=-group["weight_decay"] * step_size)
    weights.add_(-update)

    if in_place:
        return
    if param.dtype == torch.bfloat16:
        copy_stochastic_(param, weights)
    else:
        param.copy_(weights)
