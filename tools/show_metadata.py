"""Show what a model or LoRA file says about itself (upstream's tools/show_metadata.py, readable).

Without ``--json``: what the file holds (a LoRA's modules and ranks, or the kind of checkpoint), then its metadata
in groups: training settings (``ss_*``), the model spec (``modelspec.*``), the datasets as a short table, the
most frequent caption tags per folder (``--top``), and any other keys. Long values are shortened (``--full``
prints them whole). ``--json``: the raw metadata as sorted JSON, as upstream prints it. Reads the header only.

    python tools/show_metadata.py --model my_lora.safetensors
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.errors import run_cli  # noqa: E402
from library.io.safetensors_file import SafetensorsHeader, read_header  # noqa: E402
from library.models.checkpoint_kind import describe_checkpoint  # noqa: E402

SECTIONS = {"ss_datasets", "ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info"}
SHORT = 160  # characters of a value shown without --full
_LORA_DOWN = re.compile(r"^(.+)\.(?:lora_down|lora_A)\.weight$")


def _short(value: str, full: bool) -> str:
    if full or len(value) <= SHORT:
        return value
    if value.startswith("data:"):
        return f"{value.split(',', 1)[0]},... ({len(value)} characters)"
    return f"{value[:SHORT]}... ({len(value)} characters)"


def _rows(pairs: Mapping[str, str], full: bool) -> list[str]:
    width = max(map(len, pairs), default=0)
    return [f"  {key:<{width}}  {_short(value, full)}" for key, value in sorted(pairs.items())]


def _json(value: str | None):
    try:
        return json.loads(value) if value else None
    except ValueError:
        return None


def describe_contents(header: SafetensorsHeader) -> list[str]:
    """What the file holds: a LoRA's modules per part and their ranks, or the checkpoint's kind."""
    kind = describe_checkpoint(header)
    dtypes = ", ".join(sorted(header.dtypes()))
    lines = [f"  holds     {kind}: {len(header.keys())} tensors ({dtypes})"]
    if kind != "LoRA":
        return lines
    ranks: dict[str, Counter] = {}
    for key in header.keys():
        match = _LORA_DOWN.match(key)
        if match:
            name = match.group(1)
            part = "_".join(name.split("_", 2)[:2]) if name.startswith("lora_") else name.partition(".")[0]
            ranks.setdefault(part, Counter())[header.shape(key)[0]] += 1
    for part, counts in sorted(ranks.items()):
        shown = ", ".join(f"{n} x rank {r}" for r, n in sorted(counts.items()))
        lines.append(f"  {part:<9} {sum(counts.values())} modules ({shown})")
    return lines


def _dataset_rows(metadata: Mapping[str, str]) -> list[str]:
    datasets = _json(metadata.get("ss_datasets"))
    lines = []
    if isinstance(datasets, list):
        for i, d in enumerate(datasets):
            resolution = "x".join(str(v) for v in d.get("resolution", ())) or "?"
            buckets = len((d.get("bucket_info") or {}).get("buckets", {}))
            lines.append(f"  dataset {i}: {resolution}, batch {d.get('batch_size_per_device')}, "
                         f"{d.get('num_train_images')} train + {d.get('num_reg_images')} reg images, "
                         f"{buckets} buckets")  # fmt: skip
            for s in d.get("subsets", []):
                source = s.get("image_dir") or s.get("metadata_file") or "?"
                extra = " (reg)" if s.get("is_reg") else ""
                tokens = f", class_tokens {s['class_tokens']!r}" if s.get("class_tokens") else ""
                lines.append(
                    f"    {source}{extra}: {s.get('img_count')} images x {s.get('num_repeats')} repeats{tokens}"
                )
    for key, title in (("ss_dataset_dirs", "folder"), ("ss_reg_dataset_dirs", "reg folder")):
        dirs = _json(metadata.get(key))
        if isinstance(dirs, dict) and not isinstance(datasets, list):
            for name, info in dirs.items():
                lines.append(f"  {title} {name}: {info.get('img_count')} images x {info.get('n_repeats')} repeats")
    buckets = (_json(metadata.get("ss_bucket_info")) or {}).get("buckets", {})
    if buckets and not isinstance(datasets, list):
        shown = ", ".join(f"{'x'.join(map(str, b['resolution']))} ({b['count']})" for b in buckets.values())
        lines.append(f"  buckets: {shown}")
    return lines


def _tag_rows(metadata: Mapping[str, str], top: int) -> list[str]:
    frequency = _json(metadata.get("ss_tag_frequency"))
    if not isinstance(frequency, dict):
        return []
    lines = []
    for folder, tags in frequency.items():
        ranked = sorted(tags.items(), key=lambda item: (-item[1], item[0]))
        more = f" (and {len(ranked) - top} more)" if len(ranked) > top else ""
        lines.append(f"  {folder}: {len(ranked)} tags{more}")
        lines += [f"    {count:>6}  {tag}" for tag, count in ranked[:top]]
    return lines


def format_metadata(header: SafetensorsHeader, top: int = 20, full: bool = False) -> str:
    """The readable report."""
    metadata = header.metadata
    lines = [str(header.path), *describe_contents(header)]
    training = {k: v for k, v in metadata.items() if k.startswith(("ss_", "sshs_")) and k not in SECTIONS}
    spec = {k.removeprefix("modelspec."): v for k, v in metadata.items() if k.startswith("modelspec.")}
    other = {k: v for k, v in metadata.items() if not k.startswith(("ss_", "sshs_", "modelspec."))}
    groups = [("Training (ss_*)", _rows(training, full)), ("Model spec (modelspec.*)", _rows(spec, full)),
              ("Datasets", _dataset_rows(metadata)), (f"Tag frequency (top {top} per folder)", _tag_rows(metadata, top)),
              ("Other keys", _rows(other, full))]  # fmt: skip
    for title, rows in groups:
        if rows:
            lines += ["", f"{title}:", *rows]
    if not metadata:
        lines += ["", "no metadata in this file"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .safetensors model or LoRA")
    parser.add_argument("--json", action="store_true", help="print the raw metadata as sorted JSON (as upstream)")
    parser.add_argument("--top", type=int, default=20, help="caption tags shown per folder (default 20)")
    parser.add_argument("--full", action="store_true", help="print long values whole")
    args = parser.parse_args(argv)
    header = read_header(args.model, "--model")
    if args.json:
        print(json.dumps(header.metadata, indent=4, sort_keys=True))
    else:
        print(format_metadata(header, max(args.top, 0), args.full))


if __name__ == "__main__":
    run_cli(main)
