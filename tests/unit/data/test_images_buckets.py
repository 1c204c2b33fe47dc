"""Image decoding (every mode users have), header sizes with EXIF orientation, corrupt files, resize-and-crop, and
upstream's bucket choice."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.data.buckets import BucketAssigner, BucketSettings, bucket_summary, make_bucket_resolutions
from library.data.images import face_crop, face_position, list_images, load_image, read_image_size, resize_and_crop
from library.errors import UserError


def test_every_image_mode_decodes_to_rgb(tmp_path: Path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    made = {
        "rgb.png": Image.fromarray(rgb), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., 0]]), "RGBA"),
        "l.png": Image.fromarray(rgb[..., 0], "L"), "p.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "photo.webp": Image.fromarray(rgb),
        "photo.jpg": Image.fromarray(rgb), "la.png": Image.fromarray(rgb[..., :2], "LA"),
    }  # fmt: skip
    for name, image in made.items():
        image.save(tmp_path / name)
    sixteen = (rng.integers(0, 65536, (20, 30))).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "grey16.png")
    assert sorted(p.name for p in list_images(tmp_path)) == sorted([*made, "grey16.png"])
    for path in list_images(tmp_path):
        loaded = load_image(path)
        assert loaded.pixels.shape == (20, 30, 3) and loaded.pixels.dtype == np.uint8, path.name
        assert read_image_size(path) == (30, 20)
    np.testing.assert_array_equal(load_image(tmp_path / "rgb.png").pixels, rgb)
    grey = load_image(tmp_path / "grey16.png").pixels[..., 0].astype(int)
    assert np.abs(grey - np.round(sixteen / 65535 * 255)).max() <= 1  # scaled, not clipped
    alpha = load_image(tmp_path / "rgba.png", with_alpha=True).alpha
    np.testing.assert_allclose(alpha, rgb[..., 0] / 255, atol=1e-6)
    assert (load_image(tmp_path / "rgb.png", with_alpha=True).alpha == 1).all()


def test_exif_orientation_applies_to_size_and_pixels(tmp_path: Path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert read_image_size(tmp_path / "rotated.jpg") == (20, 40)
    loaded = load_image(tmp_path / "rotated.jpg").pixels
    assert loaded.shape == (40, 20, 3)
    assert loaded[:15].mean() > 200 and loaded[25:].mean() < 50  # the white half is on top after rotation


def test_corrupt_and_missing_images_name_the_file(tmp_path: Path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"junk\.png cannot be read"):
        read_image_size(tmp_path / "junk.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(UserError, match=r"nowhere does not exist"):
        list_images(tmp_path / "nowhere")


def test_resize_and_crop_centre_and_random():
    pixels = np.arange(40 * 60 * 3, dtype=np.uint32).reshape(40, 60, 3).astype(np.uint8)
    from library.data.images import LoadedImage

    image = LoadedImage(pixels, np.ones((40, 60), np.float32))
    out, (top, left) = resize_and_crop(image, (32, 32), (48, 32), random_crop=False, rng=random.Random(0))
    assert out.pixels.shape == (32, 32, 3) and out.alpha.shape == (32, 32) and (top, left) == (0, 8)
    offsets = {resize_and_crop(image, (32, 32), (48, 32), random_crop=True, rng=random.Random(s))[1] for s in range(30)}
    assert len(offsets) > 5 and all(t == 0 and 0 <= lf <= 16 for t, lf in offsets)


def test_bucket_resolutions_match_upstream_table():
    resos = make_bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert (1024, 1024) in resos and (768, 1344) in resos and (1344, 768) in resos and (512, 2048) in resos
    assert all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert resos == sorted(resos)


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [((1024, 1024), (1024, 1024), (1024, 1024)), ((2000, 1000), (1408, 704), (1408, 704)),
     ((600, 900), (832, 1216), (832, 1248)), ((512, 512), (1024, 1024), (1024, 1024))],
)  # fmt: skip
def test_each_image_goes_to_the_nearest_aspect_bucket_and_covers_it(size, bucket, resized):
    assigner = BucketAssigner(BucketSettings((1024, 1024), enable_bucket=True, min_bucket_reso=256,
                                             max_bucket_reso=2048, bucket_reso_steps=64))  # fmt: skip
    got_bucket, got_resized = assigner.assign(size)
    assert got_bucket == bucket and got_resized == resized
    assert got_resized[0] >= got_bucket[0] and got_resized[1] >= got_bucket[1]


def test_bucket_no_upscale_only_shrinks():
    assigner = BucketAssigner(BucketSettings((512, 512), enable_bucket=True, bucket_reso_steps=64,
                                             bucket_no_upscale=True))  # fmt: skip
    assert assigner.assign((300, 200)) == ((256, 192), (300, 200))  # small: own size rounded down, no upscale
    bucket, resized = assigner.assign((2000, 1000))
    assert resized[0] * resized[1] <= 512 * 512 * 1.01 and bucket[0] <= resized[0] and bucket[0] % 64 == 0
    with pytest.raises(ValueError):
        assigner.assign((50, 400))


def test_without_buckets_every_image_is_resized_to_cover_the_resolution():
    assigner = BucketAssigner(BucketSettings((512, 512)))
    assert assigner.assign((1024, 768)) == ((512, 512), (683, 512))
    assert assigner.assign((100, 200)) == ((512, 512), (512, 1024))


def test_bucket_summary_lists_each_bucket():
    text = bucket_summary({(512, 512): 10, (768, 384): 3})
    assert "512x512" in text and "768x384 (aspect 2.00), 3 images" in text and "2 buckets, 13 images" in text


def test_face_crop_keeps_the_face_in_frame():
    assert face_position(Path("person_120_80_40_50.png")) == (120, 80, 40, 50)
    assert face_position(Path("plain_name.png")) is None
    from library.data.images import LoadedImage

    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[55:105, 100:140] = 255  # the face box
    image = LoadedImage(pixels, None)
    for seed in range(10):
        out, (top, left) = face_crop(image, (64, 64), (120, 80, 40, 50), (2.0, 4.0), random_crop=False,
                                     rng=random.Random(seed))  # fmt: skip
        assert out.pixels.shape == (64, 64, 3)
        assert out.pixels[24:40, 24:40].mean() > 128  # the face is near the centre


def test_png_exif_orientation_is_read_from_the_header(tmp_path: Path):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(tmp_path / "rotated.png", exif=exif)
    assert read_image_size(tmp_path / "rotated.png") == (20, 40)
    assert load_image(tmp_path / "rotated.png").pixels.shape == (40, 20, 3)
