"""ControlNet datasets: conditioning images as control hints (``conditioning="control"``) or loss masks, paired by
file stem (missing, extra, duplicate and mis-sized files are one error naming the file, found when the dataset is
built), placed pixel for pixel like their images (centre crop, random crop, flip, no buckets, bucket_no_upscale,
face crop), with latent and text-encoder caches, the folder style, the command line and --debug_dataset.

The control image of each test image is the image with its colour channels reversed, so after any correct
processing ``conditioning_images == images.flip(1)`` exactly; a crop one pixel off, a missed flip or another
resize filter breaks it."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset import (
    DatasetOptions,
    EpochPosition,
    add_controlnet_dataset_args,
    add_dataset_args,
    add_validation_args,
    build_dataset_group,
    build_dataset_groups,
)  # fmt: skip
from library.data.debug import show_dataset
from library.data.items import is_scaled_copy
from library.errors import UserError
from tests.helpers import write_toml
from tests.unit.data.test_caches import CountingText, PoolEncoder

# (w, h): downscaled and cropped, upscaled and cropped, already a bucket, wide
SIZES = [(90, 70), (30, 40), (64, 64), (128, 50)]


def write_pair(images: Path, hints: Path, name: str, size: tuple[int, int], hint_size: tuple[int, int] | None = None,
               smooth: bool = False) -> None:  # fmt: skip
    """``images/<name>.png`` (noise, or a smooth pattern) with a caption, and ``hints/<name>.png``: the same
    pixels with the channels reversed (resized to ``hint_size`` when given)."""
    images.mkdir(parents=True, exist_ok=True)
    hints.mkdir(parents=True, exist_ok=True)
    width, height = size
    if smooth:
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1).astype(np.uint8)
    else:
        pixels = np.random.default_rng(sum(map(ord, name))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / f"{name}.png")
    (images / f"{name}.txt").write_text(f"caption {name}", encoding="utf-8")
    hint = Image.fromarray(np.ascontiguousarray(pixels[..., ::-1]))
    if hint_size is not None:
        hint = hint.resize(hint_size, Image.Resampling.LANCZOS)
    hint.save(hints / f"{name}.png")


def write_pairs(tmp_path: Path, sizes=SIZES) -> tuple[Path, Path]:
    images, hints = tmp_path / "img", tmp_path / "hint"
    for i, size in enumerate(sizes):
        write_pair(images, hints, f"img{i:03d}", size)
    return images, hints


def controlnet_config(tmp_path: Path, dataset: str = "", subset: str = "", images=None, hints=None) -> Path:
    images = images or tmp_path / "img"
    hints = hints or tmp_path / "hint"
    return write_toml(tmp_path / "cn.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
{dataset}
  [[datasets.subsets]]
  image_dir = '{images}'
  conditioning_data_dir = '{hints}'
  {subset}
""")  # fmt: skip


def control(**kw) -> DatasetOptions:
    return DatasetOptions(**{"seed": 3, "conditioning": "control", **kw})


def all_batches(group, epochs=range(1, 2)) -> list[dict]:
    return [group[EpochPosition(e, i, 0)] for e in epochs for i in range(len(group))]


def assert_aligned(batch: dict) -> None:
    hints, images = batch["conditioning_images"], batch["images"]
    assert hints.shape == images.shape and hints.dtype == torch.float32
    assert hints.min() >= -1 and hints.max() <= 1
    assert torch.equal(hints, images.flip(1)), batch["image_paths"]


BUCKETS = "enable_bucket = true\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16"


@pytest.mark.parametrize("dataset, subset", [
    (BUCKETS, ""),  # centre crop
    (BUCKETS, "random_crop = true"),
    (BUCKETS, "flip_aug = true"),
    (BUCKETS, "random_crop = true\n  flip_aug = true\n  resize_interpolation = 'bicubic'"),
    ("", "flip_aug = true"),  # no buckets: resized to cover 64x64, centre crop
    (BUCKETS + "\nbucket_no_upscale = true", "flip_aug = true"),
], ids=["centre", "random_crop", "flip_aug", "random_crop_flip_bicubic", "no_buckets", "no_upscale"])  # fmt: skip
def test_control_images_stay_aligned_pixel_for_pixel(tmp_path: Path, dataset: str, subset: str):
    write_pairs(tmp_path)
    group = build_dataset_group(control(dataset_config=controlnet_config(tmp_path, dataset, subset)))
    batches = all_batches(group, range(1, 9))
    for batch in batches:
        assert_aligned(batch)
        assert batch["alpha_masks"] is None  # control hints are never a loss mask
    crops, looks = {}, {}
    for batch in batches:
        for path, crop, image in zip(batch["image_paths"], batch["crop_top_lefts"].tolist(), batch["images"]):
            crops.setdefault(path, set()).add(tuple(crop))
            looks.setdefault(path, set()).add(image.numpy().tobytes())
    assert any(crop != (0, 0) for found in crops.values() for crop in found)  # something was cropped
    if "random_crop" in subset:
        assert max(len(found) for found in crops.values()) > 2
    if "flip_aug" in subset and "random_crop" not in subset:
        assert max(len(found) for found in looks.values()) == 2  # seen mirrored and not


def test_face_crop_places_the_control_image_like_its_image(tmp_path: Path):
    images, hints = tmp_path / "img", tmp_path / "hint"
    write_pair(images, hints, "person_60_40_24_24", (120, 90))
    write_pair(images, hints, "other_30_50_20_30", (80, 100))
    config = controlnet_config(tmp_path, subset="face_crop_aug_range = [1.5, 3.0]\n  flip_aug = true")
    group = build_dataset_group(control(dataset_config=config))
    batches = all_batches(group, range(1, 6))
    for batch in batches:
        assert_aligned(batch)
    assert len({tuple(b["crop_top_lefts"][0].tolist()) for b in batches}) > 1  # the random face scale moves it


def test_color_aug_leaves_the_control_image_alone(tmp_path: Path):
    write_pairs(tmp_path, SIZES[:2])
    plain = build_dataset_group(control(dataset_config=controlnet_config(tmp_path)))
    coloured = build_dataset_group(control(dataset_config=controlnet_config(tmp_path, subset="color_aug = true")))
    changed = 0
    for a, b in zip(all_batches(plain, range(1, 9)), all_batches(coloured, range(1, 9))):
        assert torch.equal(a["conditioning_images"], b["conditioning_images"])
        changed += not torch.equal(a["images"], b["images"])
    assert changed > 0


def test_a_scaled_copy_is_accepted_and_lands_in_place(tmp_path: Path):
    images, hints = tmp_path / "img", tmp_path / "hint"
    write_pair(images, hints, "big", (120, 90), hint_size=(60, 45), smooth=True)  # half size
    write_pair(images, hints, "small", (40, 30), hint_size=(81, 61), smooth=True)  # double, a pixel off
    group = build_dataset_group(control(dataset_config=controlnet_config(tmp_path, BUCKETS, "flip_aug = true")))
    for batch in all_batches(group, range(1, 5)):
        expected = batch["images"].flip(1)
        error = (batch["conditioning_images"] - expected).abs().mean().item()
        mirrored = (batch["conditioning_images"] - expected.flip(-1)).abs().mean().item()
        assert error < 0.03 and mirrored > 5 * error
    assert is_scaled_copy((512, 384), (1023, 767)) and not is_scaled_copy((512, 384), (1000, 700))


def test_pairing_errors_name_the_file_and_come_before_any_cache(tmp_path: Path):
    images, hints = write_pairs(tmp_path, SIZES[:3])
    config = controlnet_config(tmp_path)
    options = control(dataset_config=config, cache_latents=True, cache_latents_to_disk=True)
    (hints / "img001.png").unlink()
    with pytest.raises(UserError) as missing:
        build_dataset_group(options)
    assert str(images / "img001.png") in str(missing.value) and "has no conditioning image" in str(missing.value)
    write_pair(images, hints, "img001", SIZES[1])
    Image.new("RGB", (8, 8)).save(hints / "stray.jpg")
    with pytest.raises(UserError) as extra:
        build_dataset_group(options)
    assert str(hints / "stray.jpg") in str(extra.value) and "has no training image" in str(extra.value)
    (hints / "stray.jpg").unlink()
    Image.new("RGB", (8, 8)).save(hints / "img002.webp")
    with pytest.raises(UserError, match=r"two images named img002 \(img002.png, img002.webp\)"):
        build_dataset_group(options)
    (hints / "img002.webp").unlink()
    Image.new("RGB", (90, 90)).save(hints / "img000.png")  # the image is 90x70
    with pytest.raises(UserError) as sized:
        build_dataset_group(options)
    assert f"{hints / 'img000.png'} is 90x90, but its training image {images / 'img000.png'} is 90x70" in str(
        sized.value
    )
    for error in (missing, extra, sized):
        assert "\n" not in str(error.value) and "datasets[0].subsets[0]" in str(error.value)
    assert not list(images.glob("*.npz"))


def test_several_missing_files_are_counted_in_one_line(tmp_path: Path):
    _, hints = write_pairs(tmp_path)
    for name in ("img001.png", "img002.png", "img003.png"):
        (hints / name).unlink()
    with pytest.raises(UserError, match=r"img001.png has no conditioning image.*\(and 2 more\)"):
        build_dataset_group(control(dataset_config=controlnet_config(tmp_path)))


def test_control_and_mask_modes_need_their_kind_of_dataset(tmp_path: Path, caplog):
    write_pairs(tmp_path, SIZES[:2])
    config = controlnet_config(tmp_path)
    with pytest.raises(UserError, match="--masked_loss"):  # the network trainers' reading
        build_dataset_group(DatasetOptions(dataset_config=config))
    masks = build_dataset_group(DatasetOptions(dataset_config=config, masked_loss=True))
    assert "--masked_loss has no mask here" not in caplog.text
    hints = build_dataset_group(control(dataset_config=config, masked_loss=True))
    assert "--masked_loss has no mask here" in caplog.text  # hints are never masks
    assert "loss masks" in masks.summary() and "control hints" in hints.summary()
    plain = write_toml(tmp_path / "plain.toml", f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                                f"image_dir = '{tmp_path / 'img'}'\n")  # fmt: skip
    with pytest.raises(UserError, match=r"plain.toml: datasets\[0\]: ControlNet training needs a control image for "
                                        "every training image; set conditioning_data_dir in every subset"):  # fmt: skip
        build_dataset_group(control(dataset_config=plain))
    with pytest.raises(ValueError, match="conditioning must be one of"):
        DatasetOptions(conditioning="hint")


def test_cached_latents_pick_the_flip_of_their_control_image(tmp_path: Path):
    write_pairs(tmp_path)
    config = controlnet_config(tmp_path, BUCKETS, "flip_aug = true")
    for to_disk in (False, True):
        cached = build_dataset_group(control(dataset_config=config, cache_latents=True, cache_latents_to_disk=to_disk,
                                             cache_text_encoder_outputs=True))  # fmt: skip
        plain = build_dataset_group(control(dataset_config=config))
        encoder = PoolEncoder()
        cached.cache_latents(encoder)
        cached.cache_text_encoder_outputs(CountingText())
        flips = set()
        for a, b in zip(all_batches(cached, range(1, 7)), all_batches(plain, range(1, 7))):
            assert a["images"] is None and a["image_paths"] == b["image_paths"]
            assert_aligned(b)
            assert torch.equal(a["conditioning_images"], b["conditioning_images"])  # hint read per batch, same flip
            torch.testing.assert_close(a["latents"], encoder.encode_latents(b["images"]))  # latents of that flip
            assert a["text"]["l_pooled"][:, 0].tolist() == [float(len(c)) for c in a["captions"]]
            flips.add(torch.equal(b["images"][0], plain[EpochPosition(1, 0, 0)]["images"][0]))
        assert len(list((tmp_path / "hint").glob("*.npz"))) == 0  # the control images are never cached
    assert len(list((tmp_path / "img").glob("*.npz"))) == len(SIZES)


def test_validation_images_keep_their_control_images(tmp_path: Path):
    write_pairs(tmp_path, [(64, 64)] * 4)
    config = controlnet_config(tmp_path, "validation_split = 0.5")
    train, validation = build_dataset_groups(control(dataset_config=config))
    assert train.num_train_images == 2 and validation.num_train_images == 2
    for batch in all_batches(train) + all_batches(validation):
        assert_aligned(batch)


def test_folder_style_is_one_subset_over_train_data_dir_with_one_repeat(tmp_path: Path, caplog):
    images, hints = write_pairs(tmp_path)
    fallbacks = {"resolution": 64, "caption_extension": ".txt", "num_repeats": 5, "enable_bucket": True,
                 "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}  # fmt: skip
    group = build_dataset_group(control(train_data_dir=images, conditioning_data_dir=hints, fallbacks=fallbacks))
    (dataset,) = group.datasets
    (subset,) = dataset.config.subsets
    assert subset.image_dir == images and subset.conditioning_data_dir == hints and subset.num_repeats == 1
    assert group.num_train_images == len(SIZES)
    batches = all_batches(group)
    assert {c for b in batches for c in b["captions"]} == {f"caption img{i:03d}" for i in range(len(SIZES))}
    for batch in batches:
        assert_aligned(batch)
    (hints / "img000.png").unlink()
    with pytest.raises(UserError, match=f"--train_data_dir {images} with --conditioning_data_dir {hints}: "):
        build_dataset_group(control(train_data_dir=images, conditioning_data_dir=hints, fallbacks=fallbacks))


def test_folder_style_mistakes(tmp_path: Path, caplog):
    images, hints = write_pairs(tmp_path, SIZES[:1])
    fallbacks = {"resolution": 64, "caption_extension": ".txt"}
    with pytest.raises(UserError, match="--reg_data_dir cannot be used with --conditioning_data_dir"):
        build_dataset_group(control(train_data_dir=images, reg_data_dir=images, conditioning_data_dir=hints,
                                    fallbacks=fallbacks))  # fmt: skip
    with pytest.raises(UserError, match="--conditioning_data_dir .*missing does not exist"):
        build_dataset_group(control(train_data_dir=images, conditioning_data_dir=tmp_path / "missing"))
    with pytest.raises(UserError, match="--conditioning_data_dir needs --train_data_dir"):
        build_dataset_group(control(conditioning_data_dir=hints))
    with pytest.raises(UserError, match="ControlNet training with --train_data_dir needs --conditioning_data_dir"):
        build_dataset_group(control(train_data_dir=images, fallbacks=fallbacks))
    (tmp_path / "db" / "10_sks").mkdir(parents=True)
    with pytest.raises(UserError, match="has no images directly in it; with --conditioning_data_dir the training "):
        build_dataset_group(control(train_data_dir=tmp_path / "db", conditioning_data_dir=hints, fallbacks=fallbacks))
    config = controlnet_config(tmp_path)
    build_dataset_group(control(dataset_config=config, conditioning_data_dir=hints))
    assert "--conditioning_data_dir are ignored" in caplog.text


def test_the_controlnet_parser_gives_control_options_and_the_network_parser_refuses(tmp_path: Path):
    images, hints = write_pairs(tmp_path, SIZES[:2])
    argv = ["--train_data_dir", str(images), "--conditioning_data_dir", str(hints), "--resolution", "64",
            "--caption_extension", ".txt"]  # fmt: skip
    parser = argparse.ArgumentParser()
    for add in (add_dataset_args, add_validation_args, add_controlnet_dataset_args):
        add(parser)
    args = parser.parse_args(argv)
    args.seed, args.prior_loss_weight, args.masked_loss = 1, 1.0, False
    options = DatasetOptions.from_args(args)
    assert options.conditioning == "control" and options.conditioning_data_dir == hints
    for batch in all_batches(build_dataset_group(options)):
        assert_aligned(batch)
    plain = argparse.ArgumentParser()
    add_dataset_args(plain)
    add_validation_args(plain)
    args = plain.parse_args(argv[:2] + argv[4:])
    args.seed, args.prior_loss_weight, args.masked_loss = 1, 1.0, False
    assert DatasetOptions.from_args(args).conditioning == "mask"

    from library.training.families.flux import FLUX
    from library.training.network_training import build_network_parser

    with pytest.raises(UserError, match="--conditioning_data_dir is for the ControlNet training script"):
        build_network_parser(FLUX, "").parse_args(argv)


def test_debug_dataset_shows_and_saves_the_control_images(tmp_path: Path):
    write_pairs(tmp_path, SIZES[:2])
    group = build_dataset_group(control(dataset_config=controlnet_config(tmp_path, BUCKETS)))
    lines: list[str] = []
    show_dataset(group, tmp_path / "debug", out=lines.append)
    text = "\n".join(lines)
    assert f"control image: {tmp_path / 'hint' / 'img000.png'}" in text and "control hints" in text
    for path in sorted((tmp_path / "debug").glob("*_conditioning.png")):
        image = np.asarray(Image.open(path.with_name(path.name.replace("_conditioning", ""))))
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image[..., ::-1])
    assert len(list((tmp_path / "debug").glob("*_conditioning.png"))) == 2
