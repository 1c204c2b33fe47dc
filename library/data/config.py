"""Dataset configs: upstream's toml/json schema (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``) and its
folder style (``<repeats>_<class tokens>`` folders), checked completely before anything is loaded.

A value is looked up subset -> dataset -> general -> command line -> default. Every problem is one UserError naming
the config file, the table (``datasets[1].subsets[0]``) and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from library.data.buckets import round_bucket_range
from library.data.captions import CaptionOptions
from library.data.images import INTERPOLATIONS, list_images
from library.errors import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

logger = logging.getLogger(__name__)

# --- value checks: each returns the converted value or raises _Bad(what was expected) ---


class _Bad(Exception):
    pass


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _int(low: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad("a whole number" + (f" >= {low}" if low is not None else ""))
        if low is not None and v < low:
            raise _Bad(f"a whole number >= {low}")
        return v

    return check


def _float(low: float | None = None, high: float | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad("a number" + (f" in [{low}, {high}]" if high is not None else ""))
        if (low is not None and v < low) or (high is not None and v > high):
            raise _Bad(f"a number in [{low}, {high}]" if high is not None else f"a number >= {low}")
        return float(v)

    return check


def _str(v):
    if not isinstance(v, str):
        raise _Bad("a string (in quotes)")
    return v


def _table(v):
    if not isinstance(v, dict):
        raise _Bad("a table, e.g. { key = 1 }")
    return v


def _resolution(v):
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return (v, v)
    if (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                             for x in v)):  # fmt: skip
        return (v[0], v[1])
    raise _Bad("a size in pixels or [width, height], e.g. 1024 or [1024, 768]")


def _face_range(v):
    if (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             and x > 0 for x in v) and v[0] <= v[1]):  # fmt: skip
        return (float(v[0]), float(v[1]))
    raise _Bad("[low, high], two positive numbers with low <= high, e.g. [2.0, 4.0]")


def _interpolation(v):
    if not isinstance(v, str) or v not in INTERPOLATIONS:
        raise _Bad("one of " + ", ".join(INTERPOLATIONS))
    return v


def _path(v):
    if not isinstance(v, str) or not v:
        raise _Bad("a path (a string in quotes)")
    return v


# keys a subset, a dataset or [general] may set (subset -> dataset -> general -> command line)
SUBSET_KEYS: dict[str, Callable] = {
    "num_repeats": _int(1), "caption_extension": _str, "class_tokens": _str, "cache_info": _bool, "alpha_mask": _bool,
    "shuffle_caption": _bool, "caption_separator": _str, "keep_tokens": _int(0), "keep_tokens_separator": _str,
    "secondary_separator": _str, "enable_wildcard": _bool, "caption_prefix": _str, "caption_suffix": _str,
    "caption_dropout_rate": _float(0, 1), "caption_dropout_every_n_epochs": _int(0),
    "caption_tag_dropout_rate": _float(0, 1), "token_warmup_min": _int(0), "token_warmup_step": _float(0),
    "flip_aug": _bool, "color_aug": _bool, "random_crop": _bool, "face_crop_aug_range": _face_range,
    "custom_attributes": _table, "resize_interpolation": _interpolation,
}  # fmt: skip
# keys only a subset sets: where its images are
SUBSET_ONLY_KEYS: dict[str, Callable] = {
    "image_dir": _path, "metadata_file": _path, "conditioning_data_dir": _path, "is_reg": _bool,
}  # fmt: skip
# keys a dataset or [general] may set
DATASET_KEYS: dict[str, Callable] = {
    "resolution": _resolution, "batch_size": _int(1), "enable_bucket": _bool, "min_bucket_reso": _int(1),
    "max_bucket_reso": _int(1), "bucket_reso_steps": _int(1), "bucket_no_upscale": _bool,
    "network_multiplier": _float(), "validation_split": _float(0, 1), "validation_seed": _int(),
}  # fmt: skip
# custom_attributes this suite acts on (upstream's diff_output_preservation: see docs/dataset_config.md)
CUSTOM_ATTRIBUTES: dict[str, Callable] = {"diff_output_preservation": _bool}
CONFIG_KEYS = frozenset(SUBSET_KEYS) | frozenset(SUBSET_ONLY_KEYS) | frozenset(DATASET_KEYS)
_DEFAULTS: dict[str, object] = {
    "num_repeats": 1, "caption_extension": ".caption", "class_tokens": None, "cache_info": False,
    "alpha_mask": False, "flip_aug": False, "color_aug": False, "random_crop": False, "face_crop_aug_range": None,
    "custom_attributes": None, "resize_interpolation": None, "resolution": None, "batch_size": 1,
    "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64,
    "bucket_no_upscale": False, "network_multiplier": 1.0, "validation_split": 0.0, "validation_seed": None,
    **{f.name: f.default for f in fields(CaptionOptions)},
}  # fmt: skip
# which kind of subset each location key makes, and what it needs
_KIND_KEYS = {
    "dreambooth": ({"image_dir", "is_reg"}, ("image_dir",)),
    "finetune": ({"image_dir", "metadata_file"}, ("metadata_file",)),
    "controlnet": ({"image_dir", "conditioning_data_dir"}, ("image_dir", "conditioning_data_dir")),
}
_KIND_NAMES = {"dreambooth": "DreamBooth-style (image_dir with caption files)",
               "finetune": "fine-tune style (metadata_file)", "controlnet": "ControlNet (conditioning_data_dir)"}  # fmt: skip
_DREAMBOOTH_ONLY = {"class_tokens", "caption_extension", "is_reg"}


def command_line_fallback_keys() -> tuple[str, ...]:
    """Config keys whose command-line option (same name, or train_batch_size / dataset_repeats) is the fallback."""
    return tuple(k for k in (*SUBSET_KEYS, *DATASET_KEYS) if k not in ("class_tokens", "custom_attributes"))


@dataclass(frozen=True)
class SubsetConfig:
    where: str  # "data.toml: datasets[0].subsets[1]", for messages
    kind: str  # dreambooth | finetune | controlnet
    image_dir: Path | None
    metadata_file: Path | None = None
    conditioning_data_dir: Path | None = None
    num_repeats: int = 1
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    is_reg: bool = False
    alpha_mask: bool = False
    caption: CaptionOptions = field(default_factory=CaptionOptions)
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    network_multiplier: float = 1.0
    custom_attributes: Mapping[str, object] | None = None
    resize_interpolation: str | None = None
    cache_info: bool = False

    @property
    def diff_output_preservation(self) -> bool:
        """upstream's custom_attributes.diff_output_preservation: this subset's target is the base model's output."""
        return bool((self.custom_attributes or {}).get("diff_output_preservation", False))


@dataclass(frozen=True)
class DatasetConfig:
    where: str
    kind: str
    resolution: tuple[int, int]  # (w, h)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    validation_split: float = 0.0  # share of each non-regularization subset's images held out for validation
    validation_seed: int | None = None  # None: the training --seed
    subsets: tuple[SubsetConfig, ...] = ()


# --- reading ---


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"dataset config {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"dataset config {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
                            ) from None  # fmt: skip
    else:
        data, error = _parse_toml(text)
        if data is None:
            raise UserError(f"dataset config {path} is not valid TOML: {error}")
    if not isinstance(data, dict):
        raise UserError(f"dataset config {path} must be a table with [general] and [[datasets]]")
    return data


def _parse_toml(text: str) -> tuple[dict | None, str]:
    """Strict TOML first (its errors give line and column); then the older `toml` package upstream reads with,
    so every file upstream accepts is accepted here."""
    error = ""
    if tomllib is not None:
        try:
            return tomllib.loads(text), ""
        except tomllib.TOMLDecodeError as e:
            error = str(e)
    import toml

    try:
        return toml.loads(text), ""
    except toml.TomlDecodeError as e:
        return None, error or str(e)


class _Checker:
    """Checks one table's keys and values; every message names the file, the table and the key."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, table: str, message: str) -> None:
        raise UserError(f"{self.source}: {table}: {message}" if table else f"{self.source}: {message}")

    def check(self, table: str, values: Mapping, allowed: Mapping[str, Callable], hint: str = "") -> dict:
        out = {}
        for key, value in values.items():
            if key not in allowed:
                everything = [*SUBSET_KEYS, *SUBSET_ONLY_KEYS, *DATASET_KEYS, "subsets"]
                close = difflib.get_close_matches(key, everything, n=1, cutoff=0.75)
                if key in DATASET_KEYS:
                    self.fail(table, f"{key} is a dataset setting; set it in the [[datasets]] table or [general]")
                if key in SUBSET_ONLY_KEYS and ".subsets[" not in table:
                    self.fail(table, f"{key} belongs in a [[datasets.subsets]] table")
                if key in everything:
                    self.fail(table, f"{key} cannot be set here ({hint})")
                suggestion = f"; did you mean '{close[0]}'?" if close else ""
                self.fail(table, f"unknown key '{key}'{suggestion} (keys are listed in docs/dataset_config.md)")
            try:
                out[key] = allowed[key](value)
            except _Bad as e:
                self.fail(table, f"{key} = {_show(value)}: expected {e}")
            if key == "custom_attributes":
                out[key] = self.custom_attributes(table, out[key])
        return out

    def custom_attributes(self, table: str, values: Mapping) -> dict:
        """Known attributes are checked; others are kept (upstream passes them on) with a warning naming them."""
        for name, value in values.items():
            if name not in CUSTOM_ATTRIBUTES:
                logger.warning("%s: %s: custom_attributes.%s is not used by this suite (it knows %s); it is kept in "
                               "the batch's custom_attributes", self.source or "", table, name,
                               ", ".join(CUSTOM_ATTRIBUTES))  # fmt: skip
                continue
            try:
                CUSTOM_ATTRIBUTES[name](value)
            except _Bad as e:
                self.fail(table, f"custom_attributes.{name} = {_show(value)}: expected {e}")
        return dict(values)


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, bool) else str(value).lower()
    return text if len(text) <= 60 else text[:57] + "..."


def _kind_of(subsets: list[dict], checker: _Checker, table: str) -> str:
    kinds = []
    for raw in subsets:
        if "conditioning_data_dir" in raw:
            kinds.append("controlnet")
        elif "metadata_file" in raw:
            kinds.append("finetune")
        else:
            kinds.append("dreambooth")
    if len(set(kinds)) > 1:
        found = ", ".join(f"subsets[{i}] is {_KIND_NAMES[k]}" for i, k in enumerate(kinds))
        checker.fail(table, f"a dataset cannot mix kinds of subsets ({found}); put each kind in its own [[datasets]]")
    return kinds[0]


def _resolve_path(value: str, base: Path | None) -> Path:
    """As given (relative to the working folder, like upstream); failing that, relative to the config file."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and base is not None and (base / path).exists():
        return base / path
    return path


def _lookup(key: str, *layers: Mapping) -> object:
    for layer in layers:
        if key in layer:
            return layer[key]
    return _DEFAULTS.get(key)


def _dataset_config(
    checker: _Checker, table: str, dataset: Mapping, general: Mapping, fallbacks: Mapping, base: Path | None
) -> DatasetConfig:
    raw_subsets = dataset.get("subsets")
    if raw_subsets is None or raw_subsets == []:
        checker.fail(table, "no [[datasets.subsets]]; add one with image_dir (or metadata_file)")
    if not isinstance(raw_subsets, list) or not all(isinstance(s, dict) for s in raw_subsets):
        checker.fail(table, "subsets must be an array of tables ([[datasets.subsets]])")
    kind = _kind_of(raw_subsets, checker, table)
    values = checker.check(table, {k: v for k, v in dataset.items() if k != "subsets"}, {**SUBSET_KEYS, **DATASET_KEYS})
    cli = {k: v for k, v in fallbacks.items() if v is not None}
    layers = (values, general, cli)
    pick = lambda key: _lookup(key, *layers)  # noqa: E731

    resolution = pick("resolution")
    if resolution is None:
        checker.fail(table, "resolution is not set; set resolution in [general] or [[datasets]] (or --resolution)")
    enable_bucket = bool(pick("enable_bucket"))
    steps = int(pick("bucket_reso_steps"))
    min_reso, max_reso = int(pick("min_bucket_reso")), int(pick("max_bucket_reso"))
    if enable_bucket:
        if pick("bucket_no_upscale") and (min_reso, max_reso) != (_DEFAULTS["min_bucket_reso"],
                                                                  _DEFAULTS["max_bucket_reso"]):  # fmt: skip
            logger.warning("%s: %s: min_bucket_reso and max_bucket_reso are not used with bucket_no_upscale (each "
                           "image's bucket follows its own size), as upstream", checker.source, table)  # fmt: skip
        min_reso, max_reso = _bucket_range(checker, table, resolution, min_reso, max_reso, steps)
    subsets = []
    for j, raw in enumerate(raw_subsets):
        subsets.append(_subset_config(checker, f"{table}.subsets[{j}]", kind, raw, layers, base))
    return DatasetConfig(
        where=f"{checker.source}: {table}", kind=kind, resolution=resolution, batch_size=int(pick("batch_size")),
        enable_bucket=enable_bucket, min_bucket_reso=min_reso, max_bucket_reso=max_reso, bucket_reso_steps=steps,
        bucket_no_upscale=bool(pick("bucket_no_upscale")), network_multiplier=float(pick("network_multiplier")),
        validation_split=float(pick("validation_split")), validation_seed=pick("validation_seed"),
        subsets=tuple(subsets),
    )  # fmt: skip


def _bucket_range(
    checker: _Checker, table: str, resolution: tuple[int, int], min_reso: int, max_reso: int, steps: int
) -> tuple[int, int]:
    """upstream's rule: the limits become multiples of bucket_reso_steps (min down, max up, with a warning), then
    the resolution's sides must lie within them."""
    if min_reso > max_reso:
        checker.fail(table, f"min_bucket_reso {min_reso} is above max_bucket_reso {max_reso}")
    rounded_min, rounded_max, notes = round_bucket_range(min_reso, max_reso, steps)
    if notes:
        logger.warning("%s: %s: %s (made multiples of bucket_reso_steps %d, as upstream)", checker.source, table,
                       ", ".join(notes), steps)  # fmt: skip
    if rounded_min <= 0:
        checker.fail(table, f"min_bucket_reso {min_reso} rounds down to 0 with bucket_reso_steps {steps}; set "
                            f"min_bucket_reso to at least {steps}")  # fmt: skip
    if min(resolution) < rounded_min or max(resolution) > rounded_max:
        checker.fail(table, f"resolution {resolution[0]}x{resolution[1]} is outside the bucket range "
                            f"[{rounded_min}, {rounded_max}]; widen min_bucket_reso / max_bucket_reso or change the "
                            "resolution")  # fmt: skip
    return rounded_min, rounded_max


def _subset_config(
    checker: _Checker, table: str, kind: str, raw: Mapping, layers: tuple[Mapping, ...], base: Path | None
) -> SubsetConfig:
    location_keys, required = _KIND_KEYS[kind]
    allowed = {**SUBSET_KEYS, **{k: v for k, v in SUBSET_ONLY_KEYS.items() if k in location_keys}}
    if kind != "dreambooth":
        allowed = {k: v for k, v in allowed.items() if k not in _DREAMBOOTH_ONLY or
                   (kind == "controlnet" and k == "caption_extension")}  # fmt: skip
    values = checker.check(table, raw, allowed, hint=f"not for a {_KIND_NAMES[kind]} subset")
    for key in required:
        if key not in values:
            checker.fail(table, f"{key} is required for a {_KIND_NAMES[kind]} subset")
    paths: dict[str, Path | None] = {}
    for key in ("image_dir", "metadata_file", "conditioning_data_dir"):
        if key not in values:
            paths[key] = None
            continue
        path = _resolve_path(values[key], base)
        want_dir = key != "metadata_file"
        ok = path.is_dir() if want_dir else path.is_file()
        if not ok:
            what = ("is not a folder" if want_dir else "is not a file") if path.exists() else "does not exist"
            checker.fail(table, f"{key} {path} {what}; check the path (relative paths start at the working folder)")
        paths[key] = path
    merged = (values, *layers)
    pick = lambda key: _lookup(key, *merged)  # noqa: E731
    caption = CaptionOptions(**{f.name: pick(f.name) for f in fields(CaptionOptions)})
    if caption.keep_tokens_separator is None:
        caption = CaptionOptions(**{**caption.__dict__, "keep_tokens_separator": ""})
    class_tokens = pick("class_tokens") if kind == "dreambooth" else None
    return SubsetConfig(
        where=f"{checker.source}: {table}", kind=kind, image_dir=paths["image_dir"],
        metadata_file=paths["metadata_file"], conditioning_data_dir=paths["conditioning_data_dir"],
        num_repeats=int(pick("num_repeats")), caption_extension=str(pick("caption_extension")),
        class_tokens=class_tokens, is_reg=bool(values.get("is_reg", False)), alpha_mask=bool(pick("alpha_mask")),
        caption=caption, flip_aug=bool(pick("flip_aug")), color_aug=bool(pick("color_aug")),
        random_crop=bool(pick("random_crop")), face_crop_aug_range=_face_range_or_none(pick("face_crop_aug_range")),
        network_multiplier=float(pick("network_multiplier")), custom_attributes=pick("custom_attributes"),
        resize_interpolation=pick("resize_interpolation"), cache_info=bool(pick("cache_info")),
    )  # fmt: skip


def _face_range_or_none(value) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        return _face_range(value)
    except _Bad as e:
        raise UserError(f"--face_crop_aug_range {value}: expected {e}") from None


def _check_fallbacks(fallbacks: Mapping) -> dict:
    """Command-line values go through the same checks as config values (option names in messages)."""
    checked = {}
    allowed = {**SUBSET_KEYS, **DATASET_KEYS}
    for key, value in fallbacks.items():
        if value is None or key not in allowed:
            continue
        try:
            checked[key] = allowed[key](tuple(value) if isinstance(value, list) else value)
        except _Bad as e:
            option = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}.get(key, key)
            raise UserError(f"--{option} {value}: expected {e}") from None
    return checked


def load_dataset_config(path: Path, fallbacks: Mapping[str, object] | None = None) -> list[DatasetConfig]:
    """The datasets a config file describes, every key checked; ``fallbacks`` are command-line values."""
    path = Path(path)
    data = _read(path)
    checker = _Checker(str(path))
    fallbacks = _check_fallbacks(fallbacks or {})
    unknown = [k for k in data if k not in ("general", "datasets")]
    if unknown:
        close = difflib.get_close_matches(unknown[0], ["general", "datasets"], n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        where = "a top-level key" if not isinstance(data[unknown[0]], (dict, list)) else "a top-level table"
        checker.fail("", f"unknown {where} '{unknown[0]}'{hint} (a config has [general] and [[datasets]]; keys go "
                         "inside them)")  # fmt: skip
    general_raw = data.get("general", {})
    if not isinstance(general_raw, dict):
        checker.fail("", "general must be a table ([general])")
    general = checker.check("general", general_raw, {**SUBSET_KEYS, **DATASET_KEYS})
    datasets = data.get("datasets")
    if not datasets:
        checker.fail("", "no [[datasets]]; add at least one [[datasets]] with a [[datasets.subsets]]")
    if not isinstance(datasets, list) or not all(isinstance(d, dict) for d in datasets):
        checker.fail("", "datasets must be an array of tables ([[datasets]])")
    return [_dataset_config(checker, f"datasets[{i}]", d, general, fallbacks, path.parent)
            for i, d in enumerate(datasets)]  # fmt: skip


def _repeats_and_tokens(name: str) -> tuple[int, str] | None:
    head, _, tail = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, tail


def _folder_subsets(root: Path | None, is_reg: bool, option: str) -> list[dict]:
    if root is None:
        return []
    if not root.is_dir():
        raise UserError(f"{option} {root} " + ("is not a folder" if root.exists() else "does not exist"))
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = _repeats_and_tokens(folder.name)
        if parsed is None:
            logger.warning("%s: ignoring folder '%s' (not named '<repeats>_<class tokens>', e.g. '10_sks dog')",
                           option, folder.name)  # fmt: skip
            continue
        repeats, tokens = parsed
        if repeats < 1:
            logger.warning("%s: ignoring folder '%s' (repeats below 1)", option, folder.name)
            continue
        subsets.append({"image_dir": str(folder), "num_repeats": repeats, "class_tokens": tokens, "is_reg": is_reg})
    return subsets


def configs_from_folders(
    train_data_dir: Path, reg_data_dir: Path | None = None, in_json: Path | None = None,
    fallbacks: Mapping[str, object] | None = None, conditioning_data_dir: Path | None = None,
) -> list[DatasetConfig]:  # fmt: skip
    """upstream's folder style: one dataset from ``<repeats>_<class tokens>`` folders (and regularization folders),
    with ``in_json`` one fine-tune subset over ``train_data_dir``, or with ``conditioning_data_dir`` one ControlNet
    subset over ``train_data_dir`` itself (1 repeat, as upstream's generate_controlnet_subsets_config_by_subdirs)."""
    fallbacks = _check_fallbacks(fallbacks or {})
    train_data_dir = Path(train_data_dir)
    if conditioning_data_dir is not None:
        return [_controlnet_folder_config(train_data_dir, Path(conditioning_data_dir), reg_data_dir, in_json,
                                          fallbacks)]  # fmt: skip
    if in_json is not None:
        in_json = Path(in_json)
        if not in_json.is_file():
            raise UserError(f"--in_json {in_json} does not exist")
        subsets = [{"metadata_file": str(in_json), "image_dir": str(train_data_dir)}]
    else:
        subsets = _folder_subsets(train_data_dir, False, "--train_data_dir")
        subsets += _folder_subsets(Path(reg_data_dir) if reg_data_dir else None, True, "--reg_data_dir")
        if not any(not s["is_reg"] for s in subsets):
            loose = list_images(train_data_dir)
            hint = (f"; the {len(loose)} images directly in it must go in a subfolder named like '10_sks'"
                    if loose else "")  # fmt: skip
            raise UserError(f"--train_data_dir {train_data_dir} has no folder named '<repeats>_<class tokens>' "
                            f"(e.g. '10_sks dog'){hint}")  # fmt: skip
    checker = _Checker("command line")
    dataset = {"subsets": [_folder_subset_values(s, fallbacks) for s in subsets]}
    config = _dataset_config(checker, "--train_data_dir", dataset, {}, fallbacks, None)
    return [_rename_folder_subsets(config, subsets, train_data_dir)]


def _controlnet_folder_config(
    train_data_dir: Path, conditioning_data_dir: Path, reg_data_dir: Path | None, in_json: Path | None,
    fallbacks: Mapping,
) -> DatasetConfig:  # fmt: skip
    for option, value in (("--reg_data_dir", reg_data_dir), ("--in_json", in_json)):
        if value is not None:
            raise UserError(f"{option} cannot be used with --conditioning_data_dir (a ControlNet dataset is the images "
                            "in --train_data_dir paired with --conditioning_data_dir); drop one of them")  # fmt: skip
    for option, folder in (("--train_data_dir", train_data_dir), ("--conditioning_data_dir", conditioning_data_dir)):
        if not folder.is_dir():
            raise UserError(f"{option} {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    if not list_images(train_data_dir) and any(p.is_dir() for p in train_data_dir.iterdir()):
        raise UserError(f"--train_data_dir {train_data_dir} has no images directly in it; with "
                        "--conditioning_data_dir the training images sit in --train_data_dir itself (upstream's "
                        "ControlNet layout), not in '<repeats>_<class tokens>' folders")  # fmt: skip
    subset = {"image_dir": str(train_data_dir), "conditioning_data_dir": str(conditioning_data_dir), "num_repeats": 1}
    config = _dataset_config(_Checker("command line"), "--train_data_dir", {"subsets": [subset]}, {}, fallbacks, None)
    where = f"--train_data_dir {train_data_dir} with --conditioning_data_dir {conditioning_data_dir}"
    subsets = tuple(dataclasses.replace(s, where=where) for s in config.subsets)
    return dataclasses.replace(config, where=where, subsets=subsets)


def _folder_subset_values(subset: dict, fallbacks: Mapping) -> dict:
    values = dict(subset)
    if "metadata_file" in values:
        values["num_repeats"] = fallbacks.get("num_repeats", 1)
    return values


def _rename_folder_subsets(config: DatasetConfig, raw: list[dict], root: Path) -> DatasetConfig:
    """Folder-style messages name the folder, not a table index."""
    subsets = tuple(
        dataclasses.replace(
            s, where=f"{'--reg_data_dir' if r.get('is_reg') else '--train_data_dir'} folder {r.get('image_dir')}"
        )  # fmt: skip
        for s, r in zip(config.subsets, raw)
    )
    return dataclasses.replace(config, where=f"--train_data_dir {root}", subsets=subsets)
