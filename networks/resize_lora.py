"""Resize a LoRA to a lower rank (upstream's networks/resize_lora.py options): FLUX.1 and SD3 LoRAs, text-encoder
parts included, in sd-scripts' keys (``lora_down``/``lora_up``/``alpha``) or PEFT's (``lora_A``/``lora_B``).

Each module's delta ``scale * up @ down`` is factored by SVD (from the two factors, never the full matrix: a QR of
each factor and the SVD of a rank x rank core) and the largest singular directions are kept: lora_up = U S,
lora_down = Vh, and alpha = scale * new rank, so the kept part keeps its strength. At a module's own rank the
resize is exact. ``--new_rank`` caps every module (``--new_conv_rank`` the Conv2d 3x3 ones); a module already at or
below it keeps its rank. ``--dynamic_method`` picks each module's rank, up to that cap, as the smallest that
satisfies it:

- ``sv_ratio``: keep the singular values larger than the largest / ``--dynamic_param`` (>= 1);
- ``sv_fro``: keep the fewest whose Frobenius norm is >= ``--dynamic_param`` (0-1) of the whole;
- ``sv_cumulative``: keep the fewest whose sum is >= ``--dynamic_param`` (0-1) of the sum of all.

upstream's index functions add one more direction than each criterion asks for; here each criterion is met with
the fewest. A module whose delta is zero gets rank 1. Metadata as upstream: ``ss_training_comment`` says what was
resized, ``ss_network_dim``/``ss_network_alpha`` are the new values ("Dynamic" where they differ between
modules), the additional-networks hashes are recomputed.

    python networks/resize_lora.py --model lora.safetensors --save_to lora_r8.safetensors --new_rank 8
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.dtypes import parse_dtype  # noqa: E402
from library.errors import UserError, run_cli  # noqa: E402
from library.io.safetensors_file import atomic_save_file, read_header  # noqa: E402
from library.logging_setup import setup_logging  # noqa: E402
from library.models.checkpoint_kind import describe_checkpoint  # noqa: E402
from library.training.metadata import additional_network_hashes  # noqa: E402
from networks.convert_lora_common import (  # noqa: E402
    check_device,
    check_output_path,
    peft_modules,
    sd_scripts_modules,
)
from networks.lora import lora_scale  # noqa: E402

logger = logging.getLogger(__name__)

MIN_SV = 1e-6  # a delta whose largest singular value is below this is zero: rank 1 (upstream's rule)
METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
SAVE_PRECISIONS = ("float", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ResizeSettings:
    """``new_rank`` caps Linear and 1x1 modules, ``new_conv_rank`` the spatial Conv2d ones."""

    new_rank: int
    new_conv_rank: int
    dynamic_method: str | None = None
    dynamic_param: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.new_rank < 1 or self.new_conv_rank < 1:
            raise UserError(f"--new_rank {self.new_rank} / --new_conv_rank {self.new_conv_rank}: ranks must be >= 1")
        if self.dynamic_method is None:
            if self.dynamic_param is not None:
                raise UserError("--dynamic_param needs --dynamic_method (sv_ratio, sv_fro or sv_cumulative)")
            return
        if self.dynamic_method not in METHODS:
            raise UserError(f"--dynamic_method {self.dynamic_method}: use one of {', '.join(METHODS)}")
        param = self.dynamic_param
        if param is None:
            raise UserError(f"--dynamic_method {self.dynamic_method} needs --dynamic_param")
        if self.dynamic_method == "sv_ratio" and not param >= 1:
            raise UserError(f"--dynamic_param {param}: sv_ratio takes a ratio >= 1 (largest / smallest kept)")
        if self.dynamic_method != "sv_ratio" and not 0 < param <= 1:
            raise UserError(f"--dynamic_param {param}: {self.dynamic_method} takes a fraction in (0, 1]")


@dataclass(frozen=True)
class Resized:
    """One module after resizing, and how much of it was kept."""

    down: Tensor
    up: Tensor
    alpha: float
    old_rank: int
    sum_retained: float
    fro_retained: float
    max_ratio: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def factor_svd(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U, S, Vh of ``up @ down`` (2-D, fp32) from the factors: QR of each, then the SVD of the small core."""
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)
    return q_up @ u, s, vh @ q_down.T


def kept_rank(s: Tensor, cap: int, method: str | None, param: float | None) -> int:
    """How many singular directions to keep (``s`` descending): the fewest meeting the dynamic criterion, at
    most ``cap``; 1 for a zero delta."""
    if float(s[0]) <= MIN_SV:
        return 1
    if method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    elif method == "sv_fro":
        rank = int(torch.searchsorted(torch.cumsum(s.pow(2), 0) / s.pow(2).sum(), param**2)) + 1
    elif method == "sv_cumulative":
        rank = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), param)) + 1
    else:
        rank = cap
    return max(1, min(rank, cap, len(s)))


def resize_module(down: Tensor, up: Tensor, alpha: float | None, cap: int, settings: ResizeSettings) -> Resized:
    """The module's delta at the rank ``kept_rank`` gives, alpha = scale x new rank (the scale is unchanged)."""
    rank = down.shape[0]
    scale = lora_scale(alpha, rank)
    device = torch.device(settings.device)
    u, s, vh = factor_svd(up.to(device, torch.float32).flatten(1), down.to(device, torch.float32).flatten(1))
    k = kept_rank(s, cap, settings.dynamic_method, settings.dynamic_param)
    new_up = (u[:, :k] * s[:k]).reshape(up.shape[0], k, *up.shape[2:]).cpu()
    new_down = vh[:k].reshape(k, *down.shape[1:]).cpu()
    total, squares = float(s.sum()), float(s.pow(2).sum())
    return Resized(
        down=new_down, up=new_up, alpha=scale * k, old_rank=rank,
        sum_retained=float(s[:k].sum()) / total if total else 1.0,
        fro_retained=math.sqrt(float(s[:k].pow(2).sum()) / squares) if squares else 1.0,
        max_ratio=float(s[0] / s[k - 1]) if float(s[k - 1]) > 0 else math.inf,
    )  # fmt: skip


def _is_spatial(down: Tensor) -> bool:
    return down.ndim == 4 and down.shape[2:] != (1, 1)


def resize_state(
    state: Mapping[str, Tensor], settings: ResizeSettings, metadata: Mapping[str, str] | None = None,
    source: str = "LoRA",
) -> tuple[dict[str, Tensor], dict[str, Resized]]:  # fmt: skip
    """The resized tensors (same key format as ``state``, fp32) and each module's result. sd-scripts keys get
    their new alphas; PEFT keys have the scale folded into lora_up and no alphas (scale 1)."""
    peft = not any(k.endswith(".lora_down.weight") for k in state)
    if peft:
        modules = {m: (a, b, None) for m, (a, b) in peft_modules(state, metadata, source).items()}
    else:
        modules = sd_scripts_modules(state, source)
    out, results = {}, {}
    for name, (down, up, alpha) in modules.items():
        cap = settings.new_conv_rank if _is_spatial(down) else settings.new_rank
        result = resize_module(down, up, alpha, cap, settings)
        results[name] = result
        if peft:
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = result.down, result.up
        else:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = result.down, result.up
            out[f"{name}.alpha"] = torch.tensor(result.alpha)
    return out, results


def resized_metadata(
    metadata: Mapping[str, str], settings: ResizeSettings, results: Mapping[str, Resized]
) -> dict[str, str]:
    """upstream's updates: ``ss_training_comment``, ``ss_network_dim``, ``ss_network_alpha`` ("Dynamic" for a
    dynamic resize, or where modules end up with different values)."""
    out = {k: v for k, v in metadata.items() if not k.startswith(("sshs_", "lora_adapter_metadata"))}
    old_dim = max(r.old_rank for r in results.values())
    comment = metadata.get("ss_training_comment", "")
    if settings.dynamic_method:
        method = f"{settings.dynamic_method}: {settings.dynamic_param}"
        out["ss_training_comment"] = f"Dynamic resize with {method} from {old_dim}; {comment}"
        out["ss_network_dim"] = out["ss_network_alpha"] = "Dynamic"
        return out
    conv = "" if settings.new_rank == settings.new_conv_rank else f" (conv: {settings.new_conv_rank})"
    out["ss_training_comment"] = f"dimension is resized from {old_dim} to {settings.new_rank}{conv}; {comment}"
    ranks, alphas = {r.rank for r in results.values()}, {r.alpha for r in results.values()}
    out["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    out["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return out


def _report(results: Mapping[str, Resized], dynamic: bool) -> str:
    """upstream's --verbose table: what each module kept, then the mean Frobenius retention."""
    lines = []
    for name, r in results.items():
        line = f"{name:75} | sum(S) retained: {r.sum_retained:.1%}, fro retained: {r.fro_retained:.1%}, "
        line += f"max(S) ratio: {r.max_ratio:0.1f}"
        lines.append(line + (f", dynamic | dim: {r.rank}, alpha: {r.alpha}" if dynamic else ""))
    fro = torch.tensor([r.fro_retained for r in results.values()], dtype=torch.float64)
    std = float(fro.std(unbiased=False)) if len(fro) > 1 else 0.0
    lines.append(f"Average Frobenius norm retention: {float(fro.mean()):.2%} | std: {std:0.3f}")
    return "\n".join(lines)


def resize_file(model: Path, save_to: Path, settings: ResizeSettings, save_precision: str | None,
                overwrite: bool = False, verbose: bool = False) -> None:  # fmt: skip
    check_output_path(save_to, overwrite, "--save_to")
    header = read_header(model, "--model")
    source = f"--model {model}"
    kind = describe_checkpoint(header)
    if kind != "LoRA":
        raise UserError(f"{source}: not a LoRA file, found {kind}")
    from safetensors.torch import load_file

    state = load_file(str(model))
    dtype = parse_dtype(save_precision, "--save_precision") or next(iter(state.values())).dtype
    if settings.dynamic_method:
        logger.info(f"dynamic resize with {settings.dynamic_method}: {settings.dynamic_param}, at most rank "
                    f"{settings.new_rank}")  # fmt: skip
    resized, results = resize_state(state, settings, header.metadata, source)
    if verbose:
        print(_report(results, settings.dynamic_method is not None))
    resized = {k: v.to(dtype).contiguous() for k, v in resized.items()}
    metadata = resized_metadata(header.metadata, settings, results)
    if any(k.endswith(".lora_down.weight") for k in resized):
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_network_hashes(resized, metadata)
    atomic_save_file(resized, save_to, metadata)
    ranks = sorted({r.rank for r in results.values()})
    shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    logger.info(f"resized {len(results)} modules to {shown} ({str(dtype).removeprefix('torch.')}): {save_to}")


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the LoRA to resize (.safetensors)")
    parser.add_argument("--save_to", required=True, help="where to write the resized LoRA (.safetensors)")
    parser.add_argument("--new_rank", type=int, default=4, help="the rank to resize to (the cap with --dynamic_method)")
    parser.add_argument(
        "--new_conv_rank", type=int, default=None, help="rank of Conv2d 3x3 modules (default: --new_rank)"
    )
    parser.add_argument("--save_precision", choices=SAVE_PRECISIONS, default=None,
                        help="float, fp16 or bf16 (default: as stored; upstream defaults to float)")  # fmt: skip
    parser.add_argument("--device", default=None, help="where to compute, e.g. cuda (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="print what each module keeps")
    parser.add_argument("--dynamic_method", choices=METHODS, default=None,
                        help="pick each module's rank by its singular values; --new_rank is the most")  # fmt: skip
    parser.add_argument("--dynamic_param", type=float, default=None, help="the target of --dynamic_method")
    parser.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    args = setup_parser().parse_args(argv)
    settings = ResizeSettings(
        new_rank=args.new_rank, new_conv_rank=args.new_conv_rank if args.new_conv_rank is not None else args.new_rank,
        dynamic_method=args.dynamic_method, dynamic_param=args.dynamic_param, device=check_device(args.device),
    )  # fmt: skip
    resize_file(Path(args.model), Path(args.save_to), settings, args.save_precision, args.overwrite, args.verbose)


if __name__ == "__main__":
    run_cli(main)
