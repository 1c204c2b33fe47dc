"""Prompt files for sample images during training (upstream's formats).

``.txt``: one prompt per line, ``#`` comments, options after the prompt: ``--w`` width, ``--h`` height,
``--d`` seed, ``--s`` steps, ``--l`` CFG scale, ``--g`` guidance (distilled guidance, for models that take it), ``--cn`` a ControlNet's control image, ``--n`` negative
prompt. ``.toml``: a ``[prompt]`` table of defaults with ``[[prompt.subset]]`` entries. ``.json``: a list of
strings (parsed like txt lines) or of objects with the same keys as the toml.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import toml

from library.errors import UserError


@dataclass(frozen=True)
class SamplePrompt:
    index: int
    prompt: str
    negative_prompt: str | None = None
    width: int = 512
    height: int = 512
    seed: int | None = None
    sample_steps: int | None = None  # None: the family's default (upstream's differ by model)
    scale: float | None = None  # CFG scale; None: the family's default
    guidance_scale: float = 3.5  # distilled guidance, for models that take it
    controlnet_image: str | None = None  # --cn: the control image for a ControlNet

    def steps_or(self, default: int) -> int:
        return self.sample_steps if self.sample_steps is not None else default

    def scale_or(self, default: float) -> float:
        return self.scale if self.scale is not None else default


_LINE_OPTIONS = {
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "s": ("sample_steps", int),
    "l": ("scale", float),
    "g": ("guidance_scale", float),
    "n": ("negative_prompt", str),
    "cn": ("controlnet_image", str),
}
_OPTION = re.compile(r"^(\w+)\s+(.*)$", re.DOTALL)


def parse_prompt_line(line: str, index: int, where: str) -> SamplePrompt:
    """``"a cat --w 768 --h 512 --d 42"`` -> SamplePrompt; an unknown or malformed option is a UserError."""
    prompt, *options = line.split(" --")
    values: dict[str, object] = {}
    for option in options:
        match = _OPTION.match(option.strip())
        key = match.group(1).lower() if match else option.strip()
        if not match or key not in _LINE_OPTIONS:
            raise UserError(f"{where}: unknown sample option '--{key}' (use --w --h --d --s --l --g --n --cn)")
        name, kind = _LINE_OPTIONS[key]
        try:
            values[name] = kind(match.group(2).strip())
        except ValueError:
            raise UserError(f"{where}: '--{key} {match.group(2).strip()}' is not a valid {kind.__name__}") from None
    return _make(index, {"prompt": prompt.strip(), **values}, where)


def _make(index: int, entry: dict, where: str) -> SamplePrompt:
    known = {f.name for f in fields(SamplePrompt)} - {"index"}
    unknown = sorted(set(entry) - known - {"subset", "enum", "sample_sampler"})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values = {k: v for k, v in entry.items() if k in known}
    if "prompt" not in values:
        raise UserError(f"{where}: entry has no 'prompt'")
    try:
        prompt = SamplePrompt(index=index, **values)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None
    steps = prompt.sample_steps
    if prompt.width < 16 or prompt.height < 16 or steps is not None and steps < 1:
        raise UserError(
            f"{where}: width/height must be >= 16 and steps >= 1 (got {prompt.width}x{prompt.height}, {steps} steps)"
        )
    return prompt if steps is None else replace(prompt, sample_steps=min(steps, 1000))


def load_sample_prompts(path: str | Path, option: str = "--sample_prompts") -> list[SamplePrompt]:
    """Read and check the whole file up front, so a mistake stops the run before training, not mid-run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = toml.loads(text)["prompt"]
            defaults = {k: v for k, v in data.items() if k != "subset"}
            entries: list = [dict(defaults, **subset) for subset in data.get("subset", [])]
        elif suffix == ".json":
            entries = json.loads(text)
        else:
            entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    except (toml.TomlDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{option} {path}: cannot read prompts ({type(e).__name__}: {e})") from None
    prompts = []
    for i, entry in enumerate(entries):
        where = f"{option} {path} entry {i + 1}"
        if isinstance(entry, str):
            prompts.append(parse_prompt_line(entry, i, where))
        elif isinstance(entry, dict):
            prompts.append(_make(i, entry, where))
        else:
            raise UserError(f"{where}: expected a string or a table, found {type(entry).__name__}")
    if not prompts:
        raise UserError(f"{option} {path}: no prompts in the file")
    return prompts


def sample_image_name(
    output_name: str | None, prompt: SamplePrompt, *, epoch: int | None, step: int, stamp: str
) -> str:
    """Upstream's file name: ``<output_name>_<e000001|000100>_<index>_<timestamp>[_<seed>].png``."""
    prefix = f"{output_name}_" if output_name else ""
    counter = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed = "" if prompt.seed is None else f"_{prompt.seed}"
    return f"{prefix}{counter}_{prompt.index:02d}_{stamp}{seed}.png"
