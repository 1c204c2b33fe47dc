"""Upstream's ``--interactive`` prompt loop for the minimal-inference scripts: the models stay loaded and each line is a
prompt with inline options, ``a cat --w 1024 --h 768 --s 28 --d 42 --g 3.5 --c 1.0 --m 0.8,1.0 --n blurry``.

As upstream, size, steps, guidance, CFG scale and LoRA multipliers carry over to the next prompts; seed and negative
prompt apply to their own line only (then the command line's values return). Unlike upstream, a malformed or unknown
option is one error line and the prompt is asked again, nothing is generated from that line.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TextIO

PROMPT = (
    "Enter prompt (empty to exit). Options: --w <width> --h <height> --s <steps> --d <seed> --g <guidance>"
    " --m <multipliers for LoRA> --n <negative prompt>, `-` for empty negative prompt --c <cfg_scale>"
)


class InlineOptionError(ValueError):
    """A malformed inline option; the message is one line naming it."""


@dataclass(frozen=True)
class ImageRequest:
    """What to generate for one prompt. ``seed`` None draws one at random; ``steps`` None is the model's default;
    ``lora_multipliers`` empty leaves the LoRAs at their loaded strengths."""

    prompt: str
    negative_prompt: str | None
    seed: int | None
    width: int
    height: int
    steps: int | None
    guidance: float
    cfg_scale: float
    lora_multipliers: tuple[float, ...] = ()


_PER_LINE = ("prompt", "negative_prompt", "seed")  # the rest carries over to later prompts


def _size(text: str) -> int:
    value = int(text)
    if value < 16:
        raise ValueError("must be at least 16 pixels")
    return value


def _steps(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise ValueError("must be between 0 and 2**64 - 1")
    return value


def _negative(text: str) -> str:
    return "" if text == "-" else text


def _multipliers(text: str) -> tuple[float, ...]:
    return tuple(float(m) for m in text.split(","))


_OPTIONS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "w": ("width", _size, "an integer"),
    "h": ("height", _size, "an integer"),
    "s": ("steps", _steps, "an integer"),
    "d": ("seed", _seed, "an integer"),
    "g": ("guidance", float, "a number"),
    "c": ("cfg_scale", float, "a number"),
    "m": ("lora_multipliers", _multipliers, "comma-separated numbers"),
    "n": ("negative_prompt", _negative, "text (`-` for empty)"),
}
_OPTION = re.compile(r"(\S+)(?:\s+(.*))?", re.DOTALL)
_SPLIT = re.compile(r"(?:^|\s)--(?=\S)")


def parse_prompt_line(line: str) -> tuple[str, dict[str, object]]:
    """``"a cat --w 64 --d 7"`` -> ``("a cat", {"width": 64, "seed": 7})``; a bad option is an InlineOptionError."""
    prompt, *options = _SPLIT.split(line.strip())
    values: dict[str, object] = {}
    for option in options:
        match = _OPTION.fullmatch(option.strip())
        key, text = match.group(1), (match.group(2) or "").strip()
        if key not in _OPTIONS:
            known = " ".join(f"--{k}" for k in _OPTIONS)
            raise InlineOptionError(f"unknown option --{key} (options: {known})")
        name, convert, kind = _OPTIONS[key]
        if not text:
            raise InlineOptionError(f"--{key} needs a value ({kind})")
        try:
            values[name] = convert(text)
        except ValueError as e:
            detail = str(e) if "must" in str(e) else f"expected {kind}"
            raise InlineOptionError(f"--{key} {text!r}: {detail}") from None
    return prompt.strip(), values


def next_request(line: str, previous: ImageRequest, defaults: ImageRequest) -> ImageRequest:
    """The request for ``line``: carried-over settings from ``previous``, per-line ones from ``defaults``."""
    prompt, values = parse_prompt_line(line)
    per_line = {f.name: getattr(defaults, f.name) for f in fields(ImageRequest) if f.name in _PER_LINE}
    return replace(previous, **{**per_line, "prompt": prompt, **values})


def read_line() -> str:
    """One line from the terminal (with line editing where available); end of input reads as an empty line."""
    try:
        return input()
    except EOFError:
        return ""


def run_prompt_loop(
    defaults: ImageRequest,
    generate: Callable[[ImageRequest], object],
    read: Callable[[], str] = read_line,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Ask for prompts until an empty line or end of input and ``generate`` each; returns how many were generated.
    An InlineOptionError (from the line or from ``generate``'s own checks) is printed as one line and the prompt
    asked again; settings from a rejected line are not kept."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    previous, count = defaults, 0
    while True:
        print(PROMPT, file=stdout, flush=True)
        line = read()
        if not line.strip():
            return count
        try:
            request = next_request(line, previous, defaults)
            generate(request)
        except InlineOptionError as e:
            print(f"error: {e}", file=stderr, flush=True)
            continue
        previous, count = request, count + 1
