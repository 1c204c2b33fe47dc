"""Image files: listing, sizes from headers, decoding any common format to RGB (+ alpha), resize-and-crop.

Sizes are read without decoding pixels (PIL opens files lazily; only the header and EXIF are parsed), so scanning
thousands of images takes seconds. Every size and every crop is in display orientation (EXIF applied).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from library.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif", ".jxl", ".tif", ".tiff")
_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)
_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset((5, 6, 7, 8))  # EXIF orientations that rotate by 90 degrees

# names accepted by resize_interpolation (upstream's, with its cv2 names mapped to PIL filters)
INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS, "lanczos4": Image.Resampling.LANCZOS, "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST, "cubic": Image.Resampling.BICUBIC, "linear": Image.Resampling.BILINEAR,
}  # fmt: skip

Image.MAX_IMAGE_PIXELS = None  # users' own large scans are not decompression bombs


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserError(f"image folder {folder} {what}; check the path")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTENSIONS and p.is_file())


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(path)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image {path} cannot be read ({_reason(e)}); replace or remove it") from None


def _reason(e: BaseException) -> str:
    text = str(e).split("\n", 1)[0]
    return text or type(e).__name__


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation, read without decoding pixels. For PNG only an eXIf chunk before the image data counts
    (where the PNG spec puts it): Pillow's getexif() would decode the whole image to look for a later one."""
    try:
        if image.format == "PNG":
            raw = image.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            return int(exif.get(_ORIENTATION, 1))
        if image.format in ("JPEG", "MPO", "WEBP", "TIFF"):
            return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # a broken EXIF block does not stop training; decoding applies what it can read
        return 1
    return 1


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the file header only."""
    image = _open(path)
    try:
        width, height = image.size
        if _orientation(image) in _SWAPS_SIDES:
            width, height = height, width
    finally:
        image.close()
    if width <= 0 or height <= 0:
        raise UserError(f"image {path} has no pixels ({width}x{height}); replace or remove it")
    return width, height


@dataclass
class LoadedImage:
    pixels: np.ndarray  # uint8 [H, W, 3], RGB
    alpha: np.ndarray | None  # float32 [H, W] in [0, 1], when asked for


def _to_rgb8(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB (16-bit greyscale scaled, not clipped; palette and CMYK converted)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def _alpha(image: Image.Image) -> np.ndarray:
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        return np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    if image.mode in ("RGBa", "La"):
        return np.asarray(image.getchannel("a"), dtype=np.float32) / 255.0
    return np.ones((image.height, image.width), dtype=np.float32)  # no alpha: everything counts


def load_image(path: Path, with_alpha: bool = False) -> LoadedImage:
    """Decode ``path`` to RGB pixels in display orientation (and its alpha channel as a mask, when asked)."""
    image = _open(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            image = ImageOps.exif_transpose(image) or image
        alpha = _alpha(image) if with_alpha else None
        pixels = np.array(_to_rgb8(image))
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise UserError(f"image {path} cannot be decoded ({_reason(e)}); replace or remove it") from None
    finally:
        image.close()
    return LoadedImage(np.ascontiguousarray(pixels), alpha)


def _filter(interpolation: str | None, upscaling: bool) -> Image.Resampling:
    if interpolation is None:
        return Image.Resampling.LANCZOS if upscaling else Image.Resampling.BOX
    return INTERPOLATIONS[interpolation]


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    height, width = array.shape[:2]
    if (width, height) == size:
        return array
    upscaling = size[0] > width or size[1] > height
    if array.dtype == np.uint8:
        image = Image.fromarray(array)
    else:
        image = Image.fromarray(array.astype(np.float32), "F")
    return np.array(image.resize(size, _filter(interpolation, upscaling)))


@dataclass(frozen=True)
class Placement:
    """Where an image lands in its bucket: resized to ``resized`` (w, h), cropped to ``bucket`` (w, h) at (``top``,
    ``left``) of the resized image, then mirrored when ``flip``. A conditioning image is placed with its image's."""

    resized: tuple[int, int]
    bucket: tuple[int, int]
    top: int
    left: int
    flip: bool = False

    def __post_init__(self):
        spare_w, spare_h = self.resized[0] - self.bucket[0], self.resized[1] - self.bucket[1]
        if not (0 <= self.left <= spare_w and 0 <= self.top <= spare_h):
            raise ValueError(f"the {self.bucket[0]}x{self.bucket[1]} crop at left {self.left}, top {self.top} does "
                             f"not fit the resized image {self.resized[0]}x{self.resized[1]}")  # fmt: skip

    @property
    def crop_top_left(self) -> tuple[int, int]:
        return self.top, self.left


def bucket_placement(
    resized: tuple[int, int], bucket: tuple[int, int], *, random_crop: bool, rng: random.Random, flip: bool = False
) -> Placement:
    """Resized to ``resized`` (which covers ``bucket``) and cropped to ``bucket``: centred, or anywhere with
    ``random_crop`` (two draws from ``rng``: left, then top)."""
    if resized[0] < bucket[0] or resized[1] < bucket[1]:
        raise ValueError(f"resized image {resized[0]}x{resized[1]} does not cover the bucket {bucket[0]}x{bucket[1]}")
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    left = rng.randint(0, spare_w) if random_crop else spare_w // 2
    top = rng.randint(0, spare_h) if random_crop else spare_h // 2
    return Placement(resized, bucket, top, left, flip)


def place(image: LoadedImage, placement: Placement, interpolation: str | None = None) -> LoadedImage:
    """``image`` resized (Lanczos when enlarging, area when shrinking, unless ``interpolation`` names a filter),
    cropped and mirrored as ``placement`` says; its alpha channel goes along."""
    p = placement
    pixels = _resize(image.pixels, p.resized, interpolation)
    alpha = None if image.alpha is None else np.clip(_resize(image.alpha, p.resized, interpolation), 0, 1)
    box = (slice(p.top, p.top + p.bucket[1]), slice(p.left, p.left + p.bucket[0]))
    pixels = pixels[box][:, ::-1] if p.flip else pixels[box]
    if alpha is not None:
        alpha = (alpha[box][:, ::-1] if p.flip else alpha[box]).astype(np.float32)
        alpha = np.ascontiguousarray(alpha)
    return LoadedImage(np.ascontiguousarray(pixels), alpha)


def resize_and_crop(
    image: LoadedImage, bucket: tuple[int, int], resized_size: tuple[int, int], *, random_crop: bool,
    rng: random.Random, interpolation: str | None = None,
) -> tuple[LoadedImage, tuple[int, int]]:  # fmt: skip
    """Resize to ``resized_size`` (which covers ``bucket``) and crop to ``bucket`` (centre, or random). Returns the
    image and the crop's (top, left) in resized pixels."""
    placement = bucket_placement(resized_size, bucket, random_crop=random_crop, rng=rng)
    return place(image, placement, interpolation), placement.crop_top_left


def face_position(path: Path) -> tuple[int, int, int, int] | None:
    """upstream's face annotation in the file name: ``<name>_<cx>_<cy>_<w>_<h>.<ext>`` (pixels)."""
    tokens = path.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, w, h) if w > 0 and h > 0 else None


def face_placement(
    size: tuple[int, int], target: tuple[int, int], face: tuple[int, int, int, int], face_range: tuple[float, float],
    *, random_crop: bool, rng: random.Random, flip: bool = False,
) -> Placement:  # fmt: skip
    """upstream's face_crop_aug_range for an image of ``size`` (w, h): scale so the face's longer side is between
    ``face_range`` times the target's shorter side (never upscaling past the image), then crop ``target`` around
    the face."""
    width, height = size
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    short = min(target)
    lowest = max(target[1] / height, target[0] / width)  # the image just covers the target
    low = min(1.0, max(lowest, short / (face_size * face_range[1])))
    high = min(1.0, max(low, short / (face_size * face_range[0])))
    scale = low if low >= high else rng.uniform(low, high)
    scale = max(scale, lowest)
    resized = (max(target[0], int(width * scale + 0.5)), max(target[1], int(height * scale + 0.5)))
    centre = (int(cx * resized[0] / width + 0.5), int(cy * resized[1] / height + 0.5))
    offsets = []
    for axis in (0, 1):  # x then y
        length, want, at = resized[axis], target[axis], centre[axis]
        start = at - want // 2
        if random_crop:  # off-centre, favouring the face, to include background
            spread = max(length - at, at)
            start += rng.randint(0, spread) + rng.randint(0, spread) - spread
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            start += rng.randint(-face_size // 20, face_size // 20)
        offsets.append(max(0, min(start, length - want)))
    left, top = offsets
    return Placement(resized, target, top, left, flip)


def face_crop(
    image: LoadedImage, target: tuple[int, int], face: tuple[int, int, int, int], face_range: tuple[float, float],
    *, random_crop: bool, rng: random.Random, interpolation: str | None = None,
) -> tuple[LoadedImage, tuple[int, int]]:  # fmt: skip
    """``face_placement`` applied to ``image``: the image and the crop's (top, left)."""
    height, width = image.pixels.shape[:2]
    placement = face_placement((width, height), target, face, face_range, random_crop=random_crop, rng=rng)
    return place(image, placement, interpolation), placement.crop_top_left


def to_tensor(image: LoadedImage) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pixels as a float32 [3, H, W] tensor in [-1, 1]; alpha as [H, W] in [0, 1] (or None)."""
    pixels = torch.from_numpy(np.ascontiguousarray(image.pixels)).permute(2, 0, 1).float() / 127.5 - 1.0
    alpha = None if image.alpha is None else torch.from_numpy(np.ascontiguousarray(image.alpha)).float()
    return pixels, alpha
