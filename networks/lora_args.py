"""``--network_args`` parsing shared by every LoRA architecture: one parser per value kind, each naming the key in
its error. Keys a network does not use are one warning, not an error (upstream ignores them silently)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

from library.errors import UserError

logger = logging.getLogger(__name__)


def parse_bool_arg(kwargs: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A network_arg given as True/False (any case) or 1/0. Upstream compares with the string "True" only."""
    value = kwargs.get(key)
    if value is None or isinstance(value, bool):
        return default if value is None else value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise UserError(f"--network_args {key}={value}: expected True or False (or 1/0)")
    return text in ("true", "1")


def parse_number_arg(kwargs: Mapping[str, Any], key: str, kind: type = float) -> Any:
    """An optional int/float network_arg; None when absent."""
    value = kwargs.get(key)
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"--network_args {key}={value}: expected a {kind.__name__}") from None


def parse_int_list(kwargs: Mapping[str, Any], key: str, length: int) -> list[int] | None:
    """A list network_arg like ``[4,2,2,2,4]`` (brackets optional) of exactly ``length`` integers."""
    value = kwargs.get(key)
    if value is None:
        return None
    text = str(value).strip() if not isinstance(value, (list, tuple)) else ",".join(map(str, value))
    text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        numbers = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--network_args {key}={value}: expected {length} comma-separated integers") from None
    if len(numbers) != length:
        raise UserError(f"--network_args {key}={value}: expected {length} numbers, got {len(numbers)}")
    return numbers


def parse_block_selection(value: str, total: int, key: str) -> list[bool]:
    """``all``, ``none`` or indices and ranges like ``0,1,4-5,7`` (0-based, inclusive) -> one flag per block,
    checked against the model's real block count."""
    text = str(value).strip()
    if text == "all":
        return [True] * total
    if text in ("none", ""):
        return [False] * total
    selected = [False] * total
    for part in text.split(","):
        try:
            start, _, end = part.partition("-")
            first, last = int(start), int(end) if end else int(start)
        except ValueError:
            raise UserError(f"--network_args {key}={value}: {part!r} is not an index or a range like 4-5") from None
        if not 0 <= first <= last < total:
            raise UserError(f"--network_args {key}={value}: {part!r} is outside 0-{total - 1} (or reversed); "
                            f"this model has {total} blocks")  # fmt: skip
        selected[first : last + 1] = [True] * (last - first + 1)
    return selected


def parse_regex_values(kwargs: Mapping[str, Any], key: str, kind: type = int) -> dict[str, Any] | None:
    """``regex=value,regex=value`` (upstream's network_reg_dims / network_reg_lrs), in order, each regex checked
    to compile; None when absent."""
    value = kwargs.get(key)
    if value is None:
        return None
    values = {}
    for pair in str(value).split(","):
        if not pair.strip():
            continue
        pattern, sep, number = (s.strip() for s in pair.partition("="))
        try:
            if not sep:
                raise ValueError(pair)
            re.compile(pattern)
            values[pattern] = kind(number)
        except (re.error, ValueError):
            what = "rank" if kind is int else "lr"
            raise UserError(f"--network_args {key}: {pair.strip()!r} is not regex={what}") from None
    return values


def first_match(patterns: Mapping[str, Any] | None, name: str) -> tuple[int, Any] | None:
    """(index, value) of the first regex in ``patterns`` found in ``name``, as upstream (re.search)."""
    for index, (pattern, value) in enumerate((patterns or {}).items()):
        if re.search(pattern, name):
            return index, value
    return None


def warn_unused_args(kwargs: Mapping[str, Any], known: Iterable[str], module: str) -> None:
    """One warning naming the network_args ``module`` does not use (upstream ignores them silently)."""
    unused = sorted(set(kwargs) - set(known))
    if unused:
        logger.warning(f"--network_args {', '.join(unused)}: not used by {module}, ignored")
