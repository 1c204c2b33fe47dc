"""FLUX.1 prompt conditioning: the CLIP-L pooled vector and the T5-XXL token sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from library.models.text_encoders.clip import encode_clip_l
from library.models.text_encoders.t5 import encode_t5
from library.models.text_encoders.tokenizers import tokenize

CLIP_MAX_LENGTH = 77


def default_t5_max_length(is_schnell: bool) -> int:
    """Upstream's default --t5xxl_max_length: 256 for schnell, 512 for dev."""
    return 256 if is_schnell else 512


@dataclass
class FluxTextConditioning:
    l_pooled: Tensor  # [B, 768] CLIP-L pooled output -> the model's ``y``
    t5_out: Tensor  # [B, L, 4096] T5 hidden states -> the model's ``txt``
    txt_ids: Tensor  # [B, L, 3] zeros
    t5_attn_mask: Tensor  # [B, L] 1 for real tokens

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FluxTextConditioning:
        return FluxTextConditioning(
            self.l_pooled.to(device, dtype), self.t5_out.to(device, dtype), self.txt_ids.to(device, dtype),
            self.t5_attn_mask.to(device),
        )  # fmt: skip


class FluxTextEncoder:
    """Tokenizes and encodes prompts with CLIP-L and T5-XXL as FLUX.1 expects."""

    def __init__(
        self,
        clip_l: nn.Module,
        t5: nn.Module,
        clip_tokenizer: object,
        t5_tokenizer: object,
        t5_max_length: int,
        apply_t5_attn_mask: bool = False,
    ):
        self.clip_l, self.t5 = clip_l, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.t5_max_length = t5_max_length
        self.apply_t5_attn_mask = apply_t5_attn_mask

    def encode_clip(self, prompts: list[str], device: torch.device | str = "cpu") -> Tensor:
        """CLIP-L's pooled output alone [B, 768] (a CLIP-L LoRA trains while T5's outputs come from a cache)."""
        clip_ids, _ = tokenize(self.clip_tokenizer, prompts, CLIP_MAX_LENGTH)
        return encode_clip_l(self.clip_l, clip_ids.to(device))

    def encode(self, prompts: list[str], device: torch.device | str = "cpu") -> FluxTextConditioning:
        """Differentiable (text-encoder LoRA training needs the graph); callers that only infer wrap it in
        ``torch.no_grad()``."""
        t5_ids, t5_mask = tokenize(self.t5_tokenizer, prompts, self.t5_max_length)
        l_pooled = self.encode_clip(prompts, device)
        t5_out = encode_t5(self.t5, t5_ids.to(device), t5_mask.to(device), self.apply_t5_attn_mask)
        txt_ids = torch.zeros(len(prompts), t5_out.shape[1], 3, device=device)
        return FluxTextConditioning(l_pooled, t5_out, txt_ids, t5_mask.to(device))
