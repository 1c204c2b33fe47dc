"""The images of a subset, with their captions and sizes: DreamBooth folders (caption files beside the images),
fine-tune metadata files (json / jsonl) and ControlNet pairs; plus upstream's balancing of regularization images."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from library.data.captions import read_caption_file
from library.data.config import SubsetConfig
from library.data.images import IMAGE_EXTENSIONS, list_images, read_image_size
from library.errors import UserError
from library.io.atomic import atomic_write

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ImageItem:
    """One training image as a dataset sees it (one per subset entry, shared by nothing else)."""

    path: Path
    size: tuple[int, int]  # (w, h) with EXIF orientation applied
    caption: str  # raw, before per-step processing
    subset: SubsetConfig
    num_repeats: int
    conditioning_path: Path | None = None
    bucket: tuple[int, int] = (0, 0)  # (w, h), set by the dataset
    resized_size: tuple[int, int] = (0, 0)
    latents: object = None  # CachedLatents in memory, when cached without --cache_latents_to_disk
    latents_npz: Path | None = None  # disk cache to read, when cached with --cache_latents_to_disk
    text: dict | None = None  # text-encoder outputs in memory
    text_npz: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg


INFO_CACHE_FILE = "metadata_cache.json"  # upstream's cache_info file, in the image folder


def _caption_file(path: Path, extension: str) -> Path | None:
    """``<stem><extension>``; for upstream's face-annotated names (``name_cx_cy_w_h``) also ``name<extension>``."""
    candidates = [path.with_suffix(extension)]
    tokens = path.stem.split("_")
    if len(tokens) >= 5:
        candidates.append(path.with_name("_".join(tokens[:-4]) + extension))
    return next((c for c in candidates if c.is_file()), None)


def _read_info_cache(subset: SubsetConfig, paths: list[Path]) -> dict[str, dict] | None:
    """cache_info: sizes and captions from the folder's metadata_cache.json, when it lists exactly these images."""
    cache = subset.image_dir / INFO_CACHE_FILE
    if not cache.is_file():
        logger.info("%s: no %s yet; reading the images and writing it", subset.where, cache)
        return None
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
        if set(entries) != {str(p) for p in paths}:
            logger.warning("%s: %s lists other images than the folder has; making it again", subset.where, cache)
            return None
        for entry in entries.values():
            width, height = entry["resolution"]
            if not (isinstance(entry["caption"], str) and int(width) > 0 and int(height) > 0):
                raise ValueError("bad entry")
        return entries
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s: %s is unreadable (%s); making it again", subset.where, cache, e)
        return None


def _write_info_cache(subset: SubsetConfig, items: list[ImageItem]) -> None:
    entries = {str(i.path): {"caption": i.caption, "resolution": list(i.size)} for i in items}
    text = json.dumps(entries, ensure_ascii=False, indent=2)
    atomic_write(subset.image_dir / INFO_CACHE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _dreambooth_items(subset: SubsetConfig) -> tuple[list[ImageItem], list[Path]]:
    items, missing = [], []
    paths = list_images(subset.image_dir)
    cached = _read_info_cache(subset, paths) if subset.cache_info else None
    for path in paths:
        if cached is not None:
            entry = cached[str(path)]
            caption, size = entry["caption"], tuple(int(v) for v in entry["resolution"])
            if not caption:
                missing.append(path)
                caption = subset.class_tokens or ""
            items.append(ImageItem(path, size, caption, subset, subset.num_repeats))
            continue
        caption_file = _caption_file(path, subset.caption_extension)
        if caption_file is not None:
            caption = read_caption_file(caption_file)
            if not subset.caption.enable_wildcard:
                caption = caption.split("\n", 1)[0].strip()  # upstream uses the first line only
        else:
            caption = ""
        if not caption:
            caption = subset.class_tokens or ""
            missing.append(path)
        items.append(ImageItem(path, read_image_size(path), caption, subset, subset.num_repeats))
    if subset.cache_info and cached is None:
        _write_info_cache(subset, items)
    return items, missing


def _load_metadata(subset: SubsetConfig) -> dict[str, dict]:
    path = subset.metadata_file
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {e["image_path"]: {k: v for k, v in e.items() if k != "image_path"} for e in entries}
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{subset.where}: metadata_file {path} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{subset.where}: metadata_file {path} is not valid JSON ({e})") from None
    except (KeyError, TypeError):
        raise UserError(f"{subset.where}: metadata_file {path}: every jsonl line needs an 'image_path'") from None
    if not isinstance(data, dict):
        raise UserError(f"{subset.where}: metadata_file {path} must map image paths to {{'caption': ...}}")
    return data


def _metadata_image_path(subset: SubsetConfig, key: str) -> Path:
    path = Path(key)
    if not path.is_absolute():
        if subset.image_dir is None:
            raise UserError(f"{subset.where}: metadata_file {subset.metadata_file} has the relative image path "
                            f"'{key}'; set image_dir in the subset")  # fmt: skip
        path = subset.image_dir / key
    if path.is_file():
        return path
    for ext in IMAGE_EXTENSIONS:  # older metadata files key images by their name without extension
        candidate = path.with_name(path.name + ext)
        if candidate.is_file():
            return candidate
    raise UserError(f"{subset.where}: metadata_file {subset.metadata_file} names '{key}', but {path} does not exist")


def _finetune_items(subset: SubsetConfig) -> tuple[list[ImageItem], list[Path]]:
    items, missing = [], []
    separator = subset.caption.caption_separator
    for key, entry in _load_metadata(subset).items():
        if not isinstance(entry, dict):
            raise UserError(
                f"{subset.where}: metadata_file {subset.metadata_file}: the entry for '{key}' is not a table"
            )
        path = _metadata_image_path(subset, key)
        caption, tags = entry.get("caption") or "", entry.get("tags")
        if tags:
            if subset.caption.enable_wildcard:
                tags = tags.replace("\n", separator)
                lines = [line for line in caption.split("\n") if line.strip()] or [""]
                caption = "\n".join(f"{line}{separator}{tags}" if line else tags for line in lines)
            else:
                caption = f"{caption}{separator}{tags}" if caption else tags
        if not caption:
            missing.append(path)
        size = entry.get("image_size") or entry.get("resolution")
        size = tuple(int(v) for v in size) if size else read_image_size(path)
        items.append(ImageItem(path, size, caption, subset, subset.num_repeats))
    return items, missing


def _more(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def is_scaled_copy(size: tuple[int, int], of: tuple[int, int]) -> bool:
    """Whether an image of ``size`` (w, h) is the same picture as one of ``of``: the same size, or the same aspect
    ratio to within one of its own pixels (a uniformly scaled copy, as hint preprocessors write them)."""
    (width, height), (w, h) = size, of
    return size == of or (abs(width * h / w - height) <= 1 and abs(height * w / h - width) <= 1)


def _attach_conditioning(subset: SubsetConfig, items: list[ImageItem]) -> None:
    """Pair each image with the conditioning image of the same file stem; a missing or extra conditioning image, or
    one of another aspect ratio, is a UserError naming the file (before any model loads or cache is written)."""
    folder = subset.conditioning_data_dir
    by_stem: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in by_stem:
            raise UserError(f"{subset.where}: conditioning_data_dir {folder} has two images named {path.stem} "
                            f"({by_stem[path.stem].name}, {path.name}); keep one")  # fmt: skip
        by_stem[path.stem] = path
    missing = [item.path for item in items if item.path.stem not in by_stem]
    if missing:
        raise UserError(f"{subset.where}: {missing[0]} has no conditioning image: conditioning_data_dir {folder} "
                        f"has no image named {missing[0].stem}.*{_more(missing)}; add it or remove the training "
                        "image")  # fmt: skip
    stems = {item.path.stem for item in items}
    extra = [path for stem, path in by_stem.items() if stem not in stems]
    if extra:
        raise UserError(f"{subset.where}: conditioning image {extra[0]} has no training image: image_dir "
                        f"{subset.image_dir} has no image named {extra[0].stem}.*{_more(extra)}; add the training "
                        "image or remove the conditioning image")  # fmt: skip
    sizes: dict[Path, tuple[int, int]] = {}
    for item in items:
        path = by_stem[item.path.stem]
        size = sizes[path] = sizes.get(path) or read_image_size(path)
        if not is_scaled_copy(size, item.size):
            raise UserError(f"{subset.where}: conditioning image {path} is {size[0]}x{size[1]}, but its training "
                            f"image {item.path} is {item.size[0]}x{item.size[1]}; a conditioning image must have "
                            "its image's size (or be a scaled copy of the same aspect ratio)")  # fmt: skip
        item.conditioning_path = path


def subset_items(subset: SubsetConfig) -> list[ImageItem]:
    """The subset's images with captions and sizes (read from headers); warns once about missing captions."""
    items, missing = _finetune_items(subset) if subset.metadata_file else _dreambooth_items(subset)
    if subset.conditioning_data_dir:
        _attach_conditioning(subset, items)
    source = subset.metadata_file or subset.image_dir
    if not items:
        logger.warning("%s: no images in %s", subset.where, source)
    if missing:
        fallback = f"the class tokens '{subset.class_tokens}'" if subset.class_tokens else "an empty caption"
        logger.warning("%s: %d of %d images in %s have no caption (%s file); using %s, e.g. for %s", subset.where,
                       len(missing), len(items), source, subset.caption_extension if not subset.metadata_file
                       else "metadata", fallback, missing[0].name)  # fmt: skip
    logger.info("%s: %d images in %s, %d repeats", subset.where, len(items), source, subset.num_repeats)
    return items


def balance_regularization(train: list[ImageItem], reg: list[ImageItem]) -> list[ImageItem]:
    """Upstream's balancing: regularization images are used (cycling, repeats raised one at a time) until they
    count as many as the training images with repeats; extra regularization images are left out."""
    num_train = sum(item.num_repeats for item in train)
    if not reg:
        return []
    if num_train == 0:
        return reg
    used: list[ImageItem] = []
    count, first_pass = 0, True
    while count < num_train:
        for item in reg:
            if first_pass:
                used.append(item)
                count += item.num_repeats
            else:
                item.num_repeats += 1
                count += 1
            if count >= num_train:
                break
        first_pass = False
    return used


def split_for_validation(
    items: list[ImageItem], validation_split: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """upstream's split_train_val for one subset: the images (in folder order) shuffled by ``random.Random(seed)``,
    the last ``round(n * validation_split)`` held out for validation; training keeps the rest (upstream keeps the
    first ``ceil(n * (1 - split))``, which can overlap the held-out ones). Both lists keep the folder order."""
    if validation_split <= 0 or not items:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = round(len(items) * validation_split)
    held_out = set(order[len(order) - held :])
    return ([item for i, item in enumerate(items) if i not in held_out],
            [item for i, item in enumerate(items) if i in held_out])  # fmt: skip


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """Per image folder, how often each comma-separated tag (lower-cased) occurs in the captions, as upstream's
    ss_tag_frequency."""
    result: dict[str, Counter] = {}
    for item in items:
        folder = (item.subset.metadata_file or item.subset.image_dir or item.path.parent).name
        result.setdefault(folder, Counter()).update(t.strip().lower() for t in item.caption.split(",") if t.strip())
    return {folder: dict(counts) for folder, counts in result.items()}
