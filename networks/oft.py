"""Orthogonal fine-tuning (OFT) in upstream's format: the module, the network holding them, building one.

An ``OFTModule`` rotates the output rows of one Linear. Its output is cut into splits (``split_dims``: q/k/v and the
MLP input of fused layers, else the whole output), each split into ``dim`` blocks of ``b = split / dim`` rows; per
block a zero-initialised parameter B (``oft_blocks.<i>``, [dim, b, b] per split) gives the skew-symmetric
Q = B - Bᵀ, whose Frobenius norm (over all blocks of the split) is clamped to ``alpha * split``, and the Cayley
rotation R = (I + Q)(I - Q)⁻¹, computed in fp32 (by Cholesky: ``solve_shifted``). With the multiplier m,
R_eff = m (R - I) + I and the adapted weight is W'ₖ = R_effₖᵀ Wₖ for the k-th block of rows; the bias is unchanged.
In training and applied inference the rotation acts on the base output instead (y' = y + m ((y - bias) (R - I)) per
block, the same result without rebuilding W), so it stacks on any base computation (an fp8 upcast) and takes a
per-sample multiplier; merging writes W' (``merged_weight``, the single merge rule). Saved keys are upstream's:
``<name>.alpha`` (a scalar) and ``<name>.oft_blocks.<i>``. Attaching, saving, loading and optimizer groups are the
adapter core (networks/adapter.py); which layers are adapted is a short file per architecture (networks/oft_flux.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from library.errors import UserError
from networks.adapter import AdapterModule, AdapterNetwork, load_adapter_file
from networks.lora_args import parse_bool_arg, parse_regex_values, warn_unused_args
from networks.lora_targets import layers_in_classes, lora_name

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 1e-3  # upstream's constraint when --network_alpha is not given
_EPS = 1e-8  # upstream's guard in the norm clamp (the ratio is 1 at Q = 0)


def clamped_skew(blocks: Tensor, constraint: float) -> Tensor:
    """Q = B - Bᵀ in fp32, its Frobenius norm (over all ``blocks``, [k, b, b]) clamped to ``constraint``."""
    b = blocks.float()
    q = b - b.transpose(1, 2)
    norm = q.norm()
    return q * ((norm.clamp(max=constraint) + _EPS) / (norm + _EPS))


def solve_shifted(q: Tensor, c: float, rhs: Tensor) -> Tensor:
    """(I + cQ)⁻¹ rhs for a skew-symmetric Q: (I - cQ) rhs solved with the Cholesky factor of
    I + c²QᵀQ = (I + cQ)ᵀ(I + cQ), positive definite with eigenvalues >= 1 (the factors commute). Not LU, which
    PyTorch's CPU build breaks for batches of blocks past ~150 rows with several threads (pytorch#142815); and
    cholesky_ex does not wait for the device to check for errors. Products with I are additions, not matmuls, so
    fp32 keeps the small terms."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    factor, _ = torch.linalg.cholesky_ex(eye + (c * c) * (q.transpose(1, 2) @ q))
    return torch.cholesky_solve(rhs - c * (q @ rhs), factor)


def cayley_delta(q: Tensor) -> Tensor:
    """R - I for the Cayley rotation R = (I + Q)(I - Q)⁻¹ of a skew-symmetric Q ([k, b, b]): (I - Q)⁻¹ 2Q, exact
    to fp32 rounding of the small delta itself."""
    return solve_shifted(q, -1.0, 2.0 * q)


def cayley(q: Tensor) -> Tensor:
    """R = (I + Q)(I - Q)⁻¹ = (I - Q)⁻¹(I + Q) for skew-symmetric Q ([k, b, b]): a rotation."""
    return cayley_delta(q) + torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)


class OFTModule(AdapterModule):
    """Block-orthogonal rotation of one Linear's output rows; wraps that instance's ``forward`` while applied."""

    def __init__(
        self,
        oft_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        dim: int = 4,
        alpha: float | Tensor = DEFAULT_ALPHA,
        split_dims: Sequence[int] | None = None,
    ):
        super().__init__(oft_name, org_module, multiplier, dim)
        if not isinstance(org_module, nn.Linear):
            raise TypeError(f"{oft_name}: OFT needs a Linear, got {type(org_module).__name__}")
        out_dim = org_module.out_features
        self.split_dims = tuple(split_dims) if split_dims else (out_dim,)
        if sum(self.split_dims) != out_dim:
            raise ValueError(f"{oft_name}: split_dims {self.split_dims} need a Linear with {out_dim} outputs")
        if dim < 1 or any(size % dim for size in self.split_dims):
            raise ValueError(f"{oft_name}: {dim} blocks do not divide its output splits {self.split_dims}")
        alpha = float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.constraints = [alpha * size for size in self.split_dims]
        self.oft_blocks = nn.ParameterList(
            nn.Parameter(torch.zeros(dim, size // dim, size // dim)) for size in self.split_dims
        )

    @property
    def oft_name(self) -> str:
        return self.name

    def skews(self) -> list[Tensor]:
        """Q per split, each [dim, b, b] in fp32, within its constraint."""
        return [clamped_skew(blocks, limit) for blocks, limit in zip(self.oft_blocks, self.constraints)]

    def rotation_deltas(self) -> list[Tensor]:
        """R - I per split, each [dim, b, b] in fp32."""
        return [cayley_delta(q) for q in self.skews()]

    def rotations(self) -> list[Tensor]:
        """R per split, each [dim, b, b] in fp32."""
        return [cayley(q) for q in self.skews()]

    def forward(self, x: Tensor, org_forward: Callable[[Tensor], Tensor]) -> Tensor:
        """``org_forward(x)`` (what the base layer computes) with its output rows rotated."""
        out = org_forward(x)
        if self.merged is not None or not self.enabled:
            return out
        if not isinstance(self.multiplier, Tensor) and self.multiplier == 0:
            return out
        return out + self.output_delta(out).to(out.dtype)

    def output_delta(self, out: Tensor) -> Tensor:
        """``m ((out - bias) (R - I))`` per block of output features, in fp32: what the rotation adds to the base
        output ``out``."""
        bias = self.org_module.bias
        h = out.float() if bias is None else out.float() - bias.to(out.device, torch.float32)
        parts, start = [], 0
        for delta, size in zip(self.rotation_deltas(), self.split_dims):
            blocks = h[..., start : start + size].unflatten(-1, delta.shape[:2])
            parts.append(torch.einsum("...kn,knm->...km", blocks, delta).flatten(-2))
            start += size
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        multiplier = self.multiplier
        if isinstance(multiplier, Tensor):  # one per sample (a dataset's network_multiplier), batch first
            multiplier = multiplier.to(delta.device, delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
        return delta * multiplier

    def saved_tensors(self, keep_vars: bool = False) -> dict[str, Tensor]:
        tensors = {"alpha": self.alpha, **{f"oft_blocks.{i}": p for i, p in enumerate(self.oft_blocks)}}
        return tensors if keep_vars else {k: v.detach() for k, v in tensors.items()}

    def saved_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"alpha": (), **{f"oft_blocks.{i}": tuple(p.shape) for i, p in enumerate(self.oft_blocks)}}

    def merged_weight(self, weight: Tensor, multiplier: float, device: torch.device | str | None) -> Tensor:
        """W'ₖ = R_effₖᵀ Wₖ = Wₖ + m (Rₖ - I)ᵀ Wₖ per block of rows (splits concatenated along the rows)."""
        device = weight.device if device is None else device
        w = weight.to(device).float()
        rows, start = [], 0
        for delta, size in zip(self.rotation_deltas(), self.split_dims):
            delta = delta.to(device)
            block = w[start : start + size].unflatten(0, delta.shape[:2])  # [k, b, in]
            rows.append((block + multiplier * torch.einsum("knm,knp->kmp", delta, block)).flatten(0, 1))
            start += size
        return torch.cat(rows).to(weight.device, weight.dtype)

    def unmerged_weight(self, weight: Tensor, multiplier: float) -> Tensor:
        """Wₖ = R_effₖ⁻ᵀ W'ₖ = (I + Q)(I - cQ)⁻¹ W'ₖ with c = 2m - 1, as R_eff = (I - Q)⁻¹(I + cQ) (orthogonal only
        at m = 1, so solved, not transposed)."""
        w = weight.float()
        c = 2.0 * multiplier - 1.0
        rows, start = [], 0
        for q, size in zip(self.skews(), self.split_dims):
            q = q.to(weight.device)
            block = w[start : start + size].unflatten(0, q.shape[:2])
            solved = solve_shifted(q, -c, block)
            rows.append((solved + q @ solved).flatten(0, 1))
            start += size
        return torch.cat(rows).to(weight.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.constraints = [float(self.alpha) * size for size in self.split_dims]


@dataclass(frozen=True)
class OFTTarget:
    """One layer to rotate: its upstream OFT name, the layer, number of blocks, alpha and output splits."""

    name: str
    module: nn.Module
    dim: int
    alpha: float
    split_dims: tuple[int, ...] | None = None


class OFTNetwork(AdapterNetwork):
    """OFT modules keyed by their upstream names; denoiser only (upstream's OFT has no text-encoder modules)."""

    KIND = "OFT"
    DIM_NAME = "number of blocks"
    FOREIGN_HINT = "a LyCORIS/ComfyUI OFT file? upstream's format has one oft_blocks.<i> per output split"

    def __init__(
        self, targets: Iterable[OFTTarget], multiplier: float = 1.0, reg_lrs: Mapping[str, float] | None = None
    ):
        super().__init__((), multiplier, reg_lrs)
        modules = [OFTModule(t.name, t.module, multiplier, t.dim, t.alpha, t.split_dims) for t in targets]
        self.add_adapters(modules, text_encoder=False)

    @property
    def unet_ofts(self) -> list[AdapterModule]:
        return self.unet_adapters


@dataclass(frozen=True)
class OFTArchitecture:
    """What a ``networks/oft_<arch>.py`` declares: the layers OFT adapts and how their outputs split."""

    title: str
    module: str
    attention_classes: tuple[str, ...]  # the default targets: every Linear inside modules of these classes
    block_classes: tuple[str, ...]  # enable_all_linear: every Linear inside these
    split_dims: Callable[[str, nn.Module], tuple[int, ...] | None]  # a layer's output splits, or None: one
    prefix: str = "oft_unet"


def _linears(model: nn.Module, classes: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    return [(path, layer) for path, layer in layers_in_classes(model, classes) if isinstance(layer, nn.Linear)]


def _targets(arch: OFTArchitecture, layers: Iterable[tuple[str, nn.Linear]], dims: Mapping[str, tuple[int, float]],
             label: str | None = None) -> list[OFTTarget]:  # fmt: skip
    """One target per layer named in ``dims``, its number of blocks checked against each of its output splits: a
    UserError about --network_dim, or about the file ``label`` when the dims came from one."""
    targets = []
    for path, layer in layers:
        name = lora_name(arch.prefix, path)
        if name in dims:
            targets.append(OFTTarget(name, layer, *dims[name], arch.split_dims(path, layer)))
    for target in targets:
        splits = target.split_dims or (target.module.out_features,)
        bad = next((size for size in splits if target.dim < 1 or size % target.dim), None)
        if bad is None:
            continue
        if label is not None:
            raise UserError(f"{label}: {target.name} has {target.dim} blocks, which do not divide its output split of "
                            f"{bad} rows; was it made for another model?")  # fmt: skip
        sizes = [size for t in targets for size in (t.split_dims or (t.module.out_features,))]
        hint = _divisor_hint(math.gcd(*sizes), target.dim)
        raise UserError(f"--network_dim {target.dim}: OFT cuts each output split into that many blocks, but "
                        f"{target.name} has a split of {bad} rows; use {hint}")  # fmt: skip
    return targets


def _divisor_hint(size: int, dim: int) -> str:
    """A divisor of ``size`` (the splits' common divisor), naming those nearest to ``dim``."""
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    near = [d for d in (max((d for d in divisors if d < dim), default=None),
                        min((d for d in divisors if d > dim), default=None)) if d is not None]  # fmt: skip
    return f"a divisor of {size}, which divides every adapted split (e.g. {' or '.join(map(str, near))})"


def _alpha(network_alpha: float | None) -> float:
    if network_alpha is None:
        logger.info(f"OFT: --network_alpha not given, the constraint is {DEFAULT_ALPHA} (upstream's default)")
        return DEFAULT_ALPHA
    alpha = float(network_alpha)
    if not alpha > 0 or not math.isfinite(alpha):
        raise UserError(f"--network_alpha {network_alpha}: OFT's constraint (the largest norm of Q per unit of width) "
                        "must be a positive number, e.g. 1e-3")  # fmt: skip
    if alpha >= 1:
        logger.warning(f"--network_alpha {alpha}: large for OFT's constraint (>= 1, hardly constrains the rotation); "
                       "consider a small value like 1e-3")  # fmt: skip
    return alpha


def build_oft_network(
    arch: OFTArchitecture,
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    model: nn.Module,
    neuron_dropout: float | None,
    kwargs: Mapping[str, Any],
) -> OFTNetwork:
    """A new OFT for ``model``: ``network_dim`` blocks per output split (default 4), ``network_alpha`` the
    constraint; network_args ``enable_all_linear`` (every Linear of the blocks instead of attention only),
    ``network_reg_lrs``, ``verbose``. Upstream's create_network."""
    warn_unused_args(kwargs, ("enable_all_linear", "network_reg_lrs", "verbose"), arch.module)
    if neuron_dropout is not None:
        logger.warning(f"--network_dropout {neuron_dropout}: OFT has no dropout; ignored")
    dim = 4 if network_dim is None else int(network_dim)
    if dim < 1:
        raise UserError(f"--network_dim {dim}: OFT's number of blocks per output split must be at least 1 (e.g. 4)")
    alpha = _alpha(network_alpha)
    all_linear = parse_bool_arg(kwargs, "enable_all_linear")
    layers = _linears(model, arch.block_classes if all_linear else arch.attention_classes)
    dims = {lora_name(arch.prefix, path): (dim, alpha) for path, _ in layers}
    network = OFTNetwork(_targets(arch, layers, dims), multiplier,
                         parse_regex_values(kwargs, "network_reg_lrs", float))  # fmt: skip
    logger.info(f"OFT for {arch.title}: {dim} blocks, constraint {alpha}, multiplier {multiplier}, all linear "
                f"{all_linear}: {len(network.adapters)} modules")  # fmt: skip
    if parse_bool_arg(kwargs, "verbose"):
        for module in network.adapters:
            logger.info(f"\t{module.name:50} {module.dim} blocks, splits {module.split_dims}")
    return network


def dims_from_oft_weights(weights_sd: Mapping[str, Tensor], label: str) -> dict[str, tuple[int, float]]:
    """(number of blocks, alpha) per OFT name in a saved state dict; UserError when a module lacks its alpha."""
    dims = {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "oft_blocks.0":
            alpha = weights_sd.get(f"{name}.alpha")
            if alpha is None:
                raise UserError(f"{label}: {name} has no alpha (its constraint); not a file upstream's OFT wrote")
            dims[name] = (value.shape[0], float(alpha))
    return dims


def build_oft_network_from_weights(
    arch: OFTArchitecture,
    multiplier: float,
    file: str | os.PathLike | None,
    model: nn.Module,
    weights_sd: Mapping[str, Tensor] | None,
    for_inference: bool,
    kwargs: Mapping[str, Any],
) -> tuple[OFTNetwork, Mapping[str, Tensor]]:
    """A network shaped like a saved OFT: its modules, blocks and alpha from the file's keys (not guessed from one
    tensor, as upstream). Weights are not loaded, so the caller may load or merge them."""
    ignored = sorted(set(kwargs) - {"network_reg_lrs", "verbose"})
    if ignored:
        logger.warning(f"--network_args {', '.join(ignored)}: not used for a network built from an OFT file (its "
                       "modules and blocks come from the file)")  # fmt: skip
    if weights_sd is None:
        weights_sd = load_adapter_file(file, "OFT file")
    label = f"OFT {os.fspath(file) if file is not None else 'weights'}"
    dims = dims_from_oft_weights(weights_sd, label)
    if not dims:
        raise UserError(f"{label}: no '<name>.oft_blocks.0' keys, so not an OFT file (found e.g. "
                        f"{next(iter(weights_sd), 'nothing')})")  # fmt: skip
    layers = _linears(model, arch.block_classes)
    unknown = set(dims) - {lora_name(arch.prefix, path) for path, _ in layers}
    if unknown:
        raise UserError(f"{label}: modules not in this {arch.title} model: {', '.join(sorted(unknown)[:6])}")
    network = OFTNetwork(_targets(arch, layers, dims, label), multiplier,
                         parse_regex_values(kwargs, "network_reg_lrs", float))  # fmt: skip
    if for_inference:
        network.eval().requires_grad_(False)
    return network, weights_sd
