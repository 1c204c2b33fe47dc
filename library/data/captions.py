"""Captions: reading caption files and upstream's per-step caption processing.

Processing order (as upstream documents it): prefix/suffix, caption dropout, wildcards (or the first line), the
keep-tokens split, token warm-up, shuffling, tag dropout, then the secondary separator. Randomness comes from the
``rng`` the caller passes, so a batch's captions are a function of (seed, epoch, batch) and nothing else.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from library.errors import UserError

_WILDCARD = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @property
    def varies(self) -> bool:
        """Whether the processed caption can differ between steps (then text-encoder outputs cannot be cached)."""
        return bool(
            self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0 or self.token_warmup_step > 0 or self.enable_wildcard
        )  # fmt: skip


def read_caption_file(path: Path) -> str:
    """A caption file's text (UTF-8, a byte-order mark allowed), stripped."""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise UserError(
            f"caption file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"caption file {path} cannot be read ({e.strerror})") from None


def _split(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """``{a|b|c}`` becomes one of a, b, c; ``{{`` and ``}}`` are literal braces."""
    open_mark, close_mark = "\x00<", ">\x00"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def warmup_steps(options: CaptionOptions, max_train_steps: int) -> int:
    """token_warmup_step as a step count (a value below 1 is a fraction of the training steps)."""
    step = options.token_warmup_step
    return math.floor(step * max_train_steps) if step < 1 else int(step)


def process_caption(
    caption: str, options: CaptionOptions, rng: random.Random, *, epoch: int = 1, step: int = 0,
    max_train_steps: int = 0,
) -> str:  # fmt: skip
    """The caption the text encoder sees at ``step`` of ``epoch``."""
    o = options
    if o.caption_prefix:
        caption = f"{o.caption_prefix} {caption}"
    if o.caption_suffix:
        caption = f"{caption} {o.caption_suffix}"
    dropped = o.caption_dropout_rate > 0 and rng.random() < o.caption_dropout_rate
    dropped = dropped or (o.caption_dropout_every_n_epochs > 0 and epoch % o.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""
    if o.enable_wildcard:
        lines = [line for line in caption.split("\n") if line.strip()] or [""]
        caption = _expand_wildcards(rng.choice(lines).strip(), rng)
    else:
        caption = caption.split("\n", 1)[0].strip()

    sep = o.caption_separator
    has_keep_separator = bool(o.keep_tokens_separator) and o.keep_tokens_separator in caption
    warmup = warmup_steps(o, max_train_steps)
    if o.shuffle_caption or warmup > 0 or o.caption_tag_dropout_rate > 0 or has_keep_separator:
        fixed, suffix = [], []
        if has_keep_separator:
            fixed_part, flex_part = caption.split(o.keep_tokens_separator, 1)
            if o.keep_tokens_separator in flex_part:
                flex_part, suffix_part = flex_part.split(o.keep_tokens_separator, 1)
                suffix = _split(suffix_part, sep)
            fixed, flex = _split(fixed_part, sep), _split(flex_part, sep)
        else:
            flex = [t.strip() for t in caption.split(sep)]
            if o.keep_tokens > 0:
                fixed, flex = flex[: o.keep_tokens], flex[o.keep_tokens :]
        if warmup and step < warmup:
            count = math.floor(step * (len(flex) - o.token_warmup_min) / warmup) + o.token_warmup_min
            flex = flex[: max(0, count)]
        if o.shuffle_caption:
            rng.shuffle(flex)
        if o.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, sep)
    return caption
