"""Tokenizers shipped in the repository (library/assets/tokenizers; see PROVENANCE.md there), so everything
runs offline. Users may point to another folder in the same Hugging Face layout."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from library.errors import UserError

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "tokenizers"
_NEEDED = {"clip": ("vocab.json", "merges.txt"), "t5": ("tokenizer.json",)}


def _load(folder: str | Path | None, default: str, kind: str, option: str) -> PreTrainedTokenizerBase:
    path = Path(folder) if folder else ASSETS / default
    missing = [name for name in _NEEDED[kind] if not (path / name).is_file()]
    if not path.is_dir() or missing:
        found = "folder not found" if not path.is_dir() else f"missing {', '.join(missing)}"
        raise UserError(f"{option} {path}: not a tokenizer folder ({found})")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_clip_tokenizer(
    folder: str | Path | None = None, *, variant: str = "clip_l", option: str = "--clip_l_tokenizer"
):
    """CLIP-L (pads with the end token) or, with ``variant="clip_g"``, SD3's CLIP-G (pads with "!")."""
    return _load(folder, variant, "clip", option)


def load_t5_tokenizer(folder: str | Path | None = None, *, option: str = "--t5xxl_tokenizer"):
    return _load(folder, "t5xxl", "t5", option)


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both LongTensor [B, max_length], padded and truncated."""
    out = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids, out.attention_mask
