"""SD3/SD3.5 prompt conditioning as upstream builds it (kohya-ss sd-scripts ``library/strategy_sd3.py``).

- CLIP-L and CLIP-G read 77 tokens (truncated; CLIP-L pads with its end token, CLIP-G with id 0). Each gives its
  penultimate hidden states (no final layer norm) and its pooled ``text_embeds`` (the final-normed end token,
  projected). T5-XXL reads ``t5_max_length`` tokens (256 by default) and gives its last hidden states.
- ``context`` = cat(cat(L, G) zero-padded to the T5 width [77 tokens], T5 [t5_max_length tokens]) along the
  sequence: [B, 333, 4096] by default. ``y`` = cat(pooled L, pooled G): [B, 2048].
- ``--apply_lg_attn_mask`` / ``--apply_t5_attn_mask`` mask padding inside the encoders only; the embeddings are
  not zeroed and the MMDiT gets no mask. The masks are kept (the text-encoder cache stores them).
- Per-encoder caption dropout zeroes that encoder's part of ``lg_out``/``lg_pooled`` (or all of ``t5_out``) and its
  mask, on fresh or cached outputs alike (:func:`apply_text_dropout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from library.errors import UserError
from library.models.text_encoders.clip import encode_clip_hidden
from library.models.text_encoders.t5 import encode_t5
from library.models.text_encoders.tokenizers import load_clip_tokenizer, load_t5_tokenizer, tokenize

logger = logging.getLogger(__name__)

CLIP_MAX_LENGTH = 77
DEFAULT_T5_MAX_LENGTH = 256
T5XXL_WIDTH = 4096
NO_T5_LENGTH = 77  # upstream's stand-in for a missing T5: 77 zero tokens (diffusers uses t5_max_length)
CLIP_G_PAD_ID = 0
TEXT_CACHE_KEYS = ("lg_out", "t5_out", "lg_pooled", "clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask")


@dataclass
class SD3TextConditioning:
    """The encoded prompts; the field names are upstream's ``*_sd3_te.npz`` keys (one sample per file there)."""

    lg_out: Tensor  # [B, 77, wL + wG] CLIP-L then CLIP-G penultimate hidden states, not padded
    t5_out: Tensor  # [B, T, wT] T5 last hidden states; [B, 77, context width] zeros without a T5
    lg_pooled: Tensor  # [B, pL + pG] pooled CLIP-L then CLIP-G -> the model's ``y``
    clip_l_attn_mask: Tensor  # [B, 77] 1 for real tokens (0 everywhere for a dropped sample)
    clip_g_attn_mask: Tensor  # [B, 77]
    t5_attn_mask: Tensor  # [B, T] (zeros without a T5)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SD3TextConditioning:
        """Move to ``device``; the float tensors (not the masks) also to ``dtype`` when given."""
        return SD3TextConditioning(
            self.lg_out.to(device, dtype), self.t5_out.to(device, dtype), self.lg_pooled.to(device, dtype),
            self.clip_l_attn_mask.to(device), self.clip_g_attn_mask.to(device), self.t5_attn_mask.to(device),
        )  # fmt: skip

    def model_inputs(self) -> tuple[Tensor, Tensor]:
        """(context [B, 77 + T, wT], y [B, pL + pG]) for the MMDiT: CLIP features zero-padded to the T5 width,
        then the T5 tokens."""
        width = self.t5_out.shape[-1]
        if self.lg_out.shape[-1] > width:
            raise ValueError(f"CLIP-L + CLIP-G width {self.lg_out.shape[-1]} exceeds the T5 width {width}")
        lg = F.pad(self.lg_out, (0, width - self.lg_out.shape[-1]))
        return torch.cat([lg, self.t5_out.to(lg.dtype)], dim=1), self.lg_pooled


@dataclass(frozen=True)
class SD3TextDropoutRates:
    """``--clip_l_dropout_rate``, ``--clip_g_dropout_rate``, ``--t5_dropout_rate``: per-sample probabilities."""

    clip_l: float = 0.0
    clip_g: float = 0.0
    t5: float = 0.0

    def __post_init__(self) -> None:
        for option, rate in (("--clip_l_dropout_rate", self.clip_l), ("--clip_g_dropout_rate", self.clip_g),
                             ("--t5_dropout_rate", self.t5)):  # fmt: skip
            if not 0.0 <= rate <= 1.0:
                raise UserError(f"{option} must be between 0 and 1, got {rate}")

    @property
    def active(self) -> bool:
        return self.clip_l > 0 or self.clip_g > 0 or self.t5 > 0


@dataclass(frozen=True)
class SD3TextDrop:
    """Per-sample boolean masks [B]: True drops that encoder's output for the sample."""

    clip_l: Tensor
    clip_g: Tensor
    t5: Tensor


def draw_text_dropout(
    batch_size: int, rates: SD3TextDropoutRates, generator: torch.Generator | None = None
) -> SD3TextDrop:
    """Draw which samples lose which encoder (independently), from ``generator`` or the global torch RNG.

    The caller applies it to training captions only: never while caching outputs, never to sample prompts."""
    draws = torch.rand(3, batch_size, generator=generator)
    return SD3TextDrop(draws[0] < rates.clip_l, draws[1] < rates.clip_g, draws[2] < rates.t5)


def apply_text_dropout(cond: SD3TextConditioning, drop: SD3TextDrop, clip_l_width: int) -> SD3TextConditioning:
    """A copy of ``cond`` with the dropped encoders zeroed per sample: CLIP-L's first ``clip_l_width`` features of
    ``lg_out`` and ``lg_pooled`` and its mask, CLIP-G's remaining features and its mask, or all of ``t5_out`` and
    its mask. Works on freshly encoded and on cached outputs (upstream skips encoding dropped samples; the result is
    the same). Differentiable for the samples that are kept."""
    device = cond.lg_out.device
    l_drop, g_drop, t5_drop = (d.to(device) for d in (drop.clip_l, drop.clip_g, drop.t5))
    is_l = torch.arange(cond.lg_out.shape[-1], device=device) < clip_l_width
    is_l_pooled = torch.arange(cond.lg_pooled.shape[-1], device=device) < clip_l_width
    lg_zero = (l_drop[:, None] & is_l) | (g_drop[:, None] & ~is_l)  # [B, wL + wG]
    pooled_zero = (l_drop[:, None] & is_l_pooled) | (g_drop[:, None] & ~is_l_pooled)

    def zero(x: Tensor, where: Tensor) -> Tensor:
        return torch.where(where, torch.zeros((), dtype=x.dtype, device=x.device), x)

    return SD3TextConditioning(
        lg_out=zero(cond.lg_out, lg_zero[:, None, :]),
        t5_out=zero(cond.t5_out, t5_drop[:, None, None].to(cond.t5_out.device)),
        lg_pooled=zero(cond.lg_pooled, pooled_zero),
        clip_l_attn_mask=zero(cond.clip_l_attn_mask, l_drop[:, None].to(cond.clip_l_attn_mask.device)),
        clip_g_attn_mask=zero(cond.clip_g_attn_mask, g_drop[:, None].to(cond.clip_g_attn_mask.device)),
        t5_attn_mask=zero(cond.t5_attn_mask, t5_drop[:, None].to(cond.t5_attn_mask.device)),
    )


def load_sd3_tokenizers(
    clip_l_folder: str | None = None, clip_g_folder: str | None = None, t5_folder: str | None = None
) -> tuple[object, object, object]:
    """The bundled (or given) CLIP-L, CLIP-G and T5 tokenizers; CLIP-G is made to pad with id 0 as upstream does."""
    clip_l = load_clip_tokenizer(clip_l_folder, variant="clip_l", option="--clip_l_tokenizer")
    clip_g = load_clip_tokenizer(clip_g_folder, variant="clip_g", option="--clip_g_tokenizer")
    if clip_g.pad_token_id != CLIP_G_PAD_ID:
        clip_g.pad_token_id = CLIP_G_PAD_ID
    return clip_l, clip_g, load_t5_tokenizer(t5_folder, option="--t5xxl_tokenizer")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class SD3TextEncoder:
    """Tokenizes and encodes prompts with CLIP-L, CLIP-G and (optionally) T5-XXL as SD3 expects.

    ``clip_l`` and ``clip_g`` are ``CLIPTextModelWithProjection`` (load them with ``with_projection=True``);
    ``t5`` may be None: 77 zero tokens of ``context_width`` (T5's width, else 4096) then stand in for it."""

    def __init__(
        self,
        clip_l: nn.Module,
        clip_g: nn.Module,
        t5: nn.Module | None,
        clip_l_tokenizer: object,
        clip_g_tokenizer: object,
        t5_tokenizer: object | None,
        t5_max_length: int = DEFAULT_T5_MAX_LENGTH,
        apply_lg_attn_mask: bool = False,
        apply_t5_attn_mask: bool = False,
        context_width: int | None = None,
    ):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.clip_l_tokenizer, self.clip_g_tokenizer = clip_l_tokenizer, clip_g_tokenizer
        self.t5_tokenizer = t5_tokenizer
        self.t5_max_length = t5_max_length
        self.apply_lg_attn_mask, self.apply_t5_attn_mask = apply_lg_attn_mask, apply_t5_attn_mask
        if t5 is not None and t5_tokenizer is None:
            raise ValueError("a T5 encoder needs its tokenizer")
        t5_width = t5.config.d_model if t5 is not None else None
        if t5_width is not None and context_width not in (None, t5_width):
            raise ValueError(f"context width {context_width} differs from the T5 width {t5_width}")
        self.context_width = t5_width or context_width or T5XXL_WIDTH
        self._check_clip()

    def _check_clip(self) -> None:
        for name, model in (("CLIP-L", self.clip_l), ("CLIP-G", self.clip_g)):
            if not hasattr(model, "text_projection"):
                raise ValueError(f"SD3 needs {name} as a CLIPTextModelWithProjection (load it with_projection=True)")
        width = self.clip_l_width
        if self.clip_l.config.projection_dim != width:
            raise ValueError("SD3's CLIP-L projection must keep its width (pooled L and hidden L split y and lg_out)")
        if width + self.clip_g.config.hidden_size > self.context_width:
            raise ValueError(f"CLIP-L + CLIP-G width exceeds the context width {self.context_width}")
        weight = self.clip_l.text_projection.weight
        if not torch.equal(weight.float(), torch.eye(width, device=weight.device)):
            logger.info("CLIP-L has its own text_projection; the pooled output uses it as upstream does "
                        "(diffusers' and ComfyUI's SD3 take CLIP-L's pooled output unprojected)")  # fmt: skip

    @property
    def clip_l_width(self) -> int:
        """CLIP-L's share of ``lg_out`` and ``lg_pooled`` features (768 for the real model)."""
        return self.clip_l.config.hidden_size

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.clip_l, self.clip_g, self.t5) if m is not None]

    def _clip(self, model: nn.Module, tokenizer: object, prompts: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask = tokenize(tokenizer, prompts, CLIP_MAX_LENGTH)
        device = _device_of(model)
        hidden, pooled = encode_clip_hidden(model, ids.to(device), mask.to(device) if self.apply_lg_attn_mask else None)
        return hidden, pooled, mask

    def encode_clip(self, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The CLIP-L and CLIP-G parts alone (``lg_out``, ``lg_pooled`` and their masks), for CLIP LoRA training
        while T5's outputs come from a cache."""
        l_out, l_pooled, l_mask = self._clip(self.clip_l, self.clip_l_tokenizer, prompts)
        g_out, g_pooled, g_mask = self._clip(self.clip_g, self.clip_g_tokenizer, prompts)
        return {"lg_out": torch.cat([l_out.to(device), g_out.to(device, l_out.dtype)], dim=-1),
                "lg_pooled": torch.cat([l_pooled.to(device), g_pooled.to(device, l_pooled.dtype)], dim=-1),
                "clip_l_attn_mask": l_mask.to(device), "clip_g_attn_mask": g_mask.to(device)}  # fmt: skip

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> SD3TextConditioning:
        """Encode ``prompts`` onto ``device``. Differentiable (text-encoder LoRA trains through it); callers that
        only infer wrap it in ``torch.no_grad()``. No dropout here: see :func:`apply_text_dropout`."""
        clip = self.encode_clip(prompts, device)
        lg_out, lg_pooled = clip["lg_out"], clip["lg_pooled"]
        l_mask, g_mask = clip["clip_l_attn_mask"], clip["clip_g_attn_mask"]
        if self.t5 is None:
            t5_out = torch.zeros(len(prompts), NO_T5_LENGTH, self.context_width, device=device, dtype=lg_out.dtype)
            t5_mask = torch.zeros(len(prompts), NO_T5_LENGTH, dtype=l_mask.dtype)
        else:
            t5_ids, t5_mask = tokenize(self.t5_tokenizer, prompts, self.t5_max_length)
            t5_device = _device_of(self.t5)
            t5_out = encode_t5(self.t5, t5_ids.to(t5_device), t5_mask.to(t5_device), self.apply_t5_attn_mask)
            t5_out = t5_out.to(device)
        return SD3TextConditioning(lg_out, t5_out, lg_pooled, l_mask, g_mask, t5_mask.to(device))
