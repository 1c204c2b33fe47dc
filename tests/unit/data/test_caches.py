"""Latent and text-encoder caches: upstream's file names and keys, reuse, invalidation (settings, shapes, corrupt
files) with a warning naming the file, several resolutions in one file, refusal where a cache would be wrong, and
no half-written file after a kill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from library.data import caches
from library.data.dataset import DatasetOptions, EpochPosition, build_dataset_group, build_dataset_groups
from library.data.encode_caches import Shard
from library.errors import UserError
from tests.helpers import write_images, write_toml


class PoolEncoder:
    """A stand-in AE: 8x average pooling, 16 channels; counts what it encodes."""

    cache_suffix = "flux"
    latent_downscale = 8
    latent_channels = 16

    def __init__(self):
        self.encoded = 0

    def encode_latents(self, images: torch.Tensor, keys=None) -> torch.Tensor:
        self.encoded += images.shape[0]
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled * (i + 1) for i in range(6)], dim=1)[:, :16]


class CountingText:
    cache_suffix = "flux"
    text_cache_keys = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")

    def __init__(self, apply_mask: bool = False, length: int = 8):
        self.apply_mask, self.length, self.captions = apply_mask, length, []

    @property
    def text_cache_fingerprint(self):
        return {"apply_t5_attn_mask": self.apply_mask}

    @property
    def text_cache_shapes(self):
        return {"t5_out": (self.length, None)}

    def encode_text(self, captions):
        self.captions.extend(captions)
        n = len(captions)
        codes = torch.tensor([[float(len(c))] for c in captions])
        return {"l_pooled": codes.expand(n, 4).clone(), "t5_out": codes[:, None].expand(n, self.length, 4).clone(),
                "txt_ids": torch.zeros(n, self.length, 3), "t5_attn_mask": torch.ones(n, self.length, dtype=torch.long)}  # fmt: skip


def make_group(tmp_path: Path, extra: str = "", resolutions=(64,), **kw):
    if not (tmp_path / "img").exists():
        write_images(tmp_path / "img", [(64, 64), (96, 64)], ["one", "two"])
    datasets = "".join(
        f"""
[[datasets]]
resolution = {r}
batch_size = 1
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 256
bucket_reso_steps = 16
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  caption_extension = ".txt"
  {extra}
"""
        for r in resolutions
    )
    config = write_toml(tmp_path / "d.toml", datasets)
    return build_dataset_group(DatasetOptions(dataset_config=config, seed=0, **kw))


def test_latent_cache_files_names_keys_and_reuse(tmp_path: Path):
    group = make_group(tmp_path, "flip_aug = true", resolutions=(64, 128), cache_latents=True,
                       cache_latents_to_disk=True, vae_batch_size=2)  # fmt: skip
    encoder = PoolEncoder()
    assert group.cache_latents(encoder) == 4  # 2 images x 2 resolutions
    files = sorted(p.name for p in (tmp_path / "img").glob("*.npz"))
    assert files == ["img000_0064x0064_flux.npz", "img001_0096x0064_flux.npz"]
    with np.load(tmp_path / "img" / "img000_0064x0064_flux.npz") as npz:
        assert {"latents_8x8", "latents_flipped_8x8", "original_size_8x8", "crop_ltrb_8x8", "latents_16x16"} <= set(
            npz.files
        )
        assert npz["latents_8x8"].shape == (16, 8, 8) and npz["original_size_8x8"].tolist() == [64, 64]
    again = make_group(tmp_path, "flip_aug = true", resolutions=(64, 128), cache_latents=True,
                       cache_latents_to_disk=True)  # fmt: skip
    encoder2 = PoolEncoder()
    assert again.cache_latents(encoder2) == 0 and encoder2.encoded == 0
    batch = again[EpochPosition(1, 0, 0)]
    assert batch["latents"] is not None and batch["images"] is None
    assert batch["latents"].shape[1] == 16


def test_cached_latents_equal_the_uncached_image_encoded(tmp_path: Path):
    group = make_group(tmp_path, cache_latents=True)
    plain = make_group(tmp_path)
    encoder = PoolEncoder()
    group.cache_latents(encoder)
    assert not list((tmp_path / "img").glob("*.npz"))  # memory only
    for i in range(len(group)):
        cached, uncached = group[EpochPosition(1, i, 0)], plain[EpochPosition(1, i, 0)]
        assert cached["image_paths"] == uncached["image_paths"]
        torch.testing.assert_close(cached["latents"], encoder.encode_latents(uncached["images"]))


def test_stale_and_corrupt_latent_caches_are_remade_and_named(tmp_path: Path, caplog):
    make_group(tmp_path, cache_latents=True, cache_latents_to_disk=True).cache_latents(PoolEncoder())
    good, other = tmp_path / "img" / "img000_0064x0064_flux.npz", tmp_path / "img" / "img001_0096x0064_flux.npz"
    other.write_bytes(b"not a zip file")
    group = make_group(tmp_path, "flip_aug = true", cache_latents=True, cache_latents_to_disk=True)
    encoder = PoolEncoder()
    assert group.cache_latents(encoder) == 2
    assert f"{good}" in caplog.text and "no flipped latents" in caplog.text
    assert f"{other}" in caplog.text and "unreadable" in caplog.text
    assert caches.latents_problem(other, (6, 10), 16, flip=True, alpha_mask=False) is None  # bucket 80x48
    caplog.clear()
    skip = make_group(tmp_path, "alpha_mask = true", cache_latents=True, cache_latents_to_disk=True,
                      skip_cache_check=True)  # fmt: skip
    assert skip.cache_latents(PoolEncoder()) == 0  # --skip_cache_check trusts existing files


def test_latent_caching_is_refused_with_changing_augmentations(tmp_path: Path):
    for key in ("color_aug", "random_crop"):
        group = make_group(tmp_path, f"{key} = true", cache_latents=True)
        with pytest.raises(UserError, match=f"datasets\\[0\\].subsets\\[0\\]: {key}"):
            group.cache_latents(PoolEncoder())


def test_processes_split_the_disk_caches(tmp_path: Path):
    """Process i of N writes every N-th image's and caption's files; together they cover the dataset once."""
    group = make_group(tmp_path, cache_latents=True, cache_latents_to_disk=True, cache_text_encoder_outputs=True,
                       cache_text_encoder_outputs_to_disk=True)  # fmt: skip
    written = []
    for index in (1, 0):
        before = set((tmp_path / "img").glob("*.npz"))
        encoded = group.cache_latents(PoolEncoder(), shard=Shard(index, 2))
        group.cache_text_encoder_outputs(CountingText(), shard=Shard(index, 2))
        new = set((tmp_path / "img").glob("*.npz")) - before
        assert encoded >= 1 and len(new) >= 2
        written.append(new)
    assert not written[0] & written[1]
    assert group.cache_latents(PoolEncoder()) == 0 and group.cache_text_encoder_outputs(CountingText()) == 0


def test_a_kill_during_a_cache_write_leaves_the_old_file(tmp_path: Path, monkeypatch):
    group = make_group(tmp_path, cache_latents=True, cache_latents_to_disk=True)
    group.cache_latents(PoolEncoder())
    path = tmp_path / "img" / "img000_0064x0064_flux.npz"
    before = path.read_bytes()

    def killed(file, **arrays):
        file.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(caches.np, "savez", killed)
    flipped = make_group(tmp_path, "flip_aug = true", cache_latents=True, cache_latents_to_disk=True)
    with pytest.raises(KeyboardInterrupt):
        flipped.cache_latents(PoolEncoder())
    assert path.read_bytes() == before
    assert not [p for p in (tmp_path / "img").iterdir() if p.name.startswith(".")]  # no temporary left


def test_text_cache_reuse_fingerprint_and_shape(tmp_path: Path, caplog):
    group = make_group(tmp_path, 'caption_prefix = "photo of"', cache_text_encoder_outputs=True,
                       cache_text_encoder_outputs_to_disk=True)  # fmt: skip
    text = CountingText()
    assert group.cache_text_encoder_outputs(text) == 2
    assert sorted(text.captions) == ["photo of one", "photo of two"]
    path = tmp_path / "img" / "img000_flux_te.npz"
    with np.load(path) as npz:
        assert set(npz.files) == {"l_pooled", "t5_out", "txt_ids", "t5_attn_mask", "apply_t5_attn_mask"}
    assert group.cache_text_encoder_outputs(CountingText()) == 0
    batch = group[EpochPosition(1, 0, 0)]
    assert batch["text"]["t5_out"].shape == (1, 8, 4)
    assert group.cache_text_encoder_outputs(CountingText(apply_mask=True)) == 2
    assert f"{path}" in caplog.text and "apply_t5_attn_mask" in caplog.text
    caplog.clear()
    assert group.cache_text_encoder_outputs(CountingText(apply_mask=True, length=16)) == 2
    assert "t5_out has shape" in caplog.text


def test_text_caching_is_refused_when_captions_change(tmp_path: Path):
    for extra in ("shuffle_caption = true", "caption_dropout_rate = 0.1", "caption_tag_dropout_rate = 0.2"):
        group = make_group(tmp_path, extra, cache_text_encoder_outputs=True)
        with pytest.raises(UserError, match=extra.split(" ")[0]):
            group.cache_text_encoder_outputs(CountingText())


def test_in_memory_text_cache_feeds_batches(tmp_path: Path):
    group = make_group(tmp_path, cache_text_encoder_outputs=True)
    group.cache_text_encoder_outputs(CountingText())
    assert not list((tmp_path / "img").glob("*_te.npz"))
    for i in range(len(group)):
        batch = group[EpochPosition(1, i, 0)]
        assert batch["text"]["l_pooled"][0, 0].item() == len(batch["captions"][0])


class UpstreamShapedText(CountingText):
    """The FLUX codec's shape rule: T5 output, ids and mask all of the T5 length."""

    @property
    def text_cache_shapes(self):
        return {"t5_out": (self.length, None), "txt_ids": (self.length, 3), "t5_attn_mask": (self.length,)}


def write_upstream_caches(group, apply_t5_attn_mask: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Each image's *_flux.npz and *_flux_te.npz as upstream's strategy_flux.py / strategy_base.py write them:
    np.savez with float32 latents [16, h, w], original_size (w, h) and crop_ltrb as int64, alpha_mask float32 [H, W],
    T5 mask int64, apply_t5_attn_mask a bool scalar."""
    written = {}
    rng = np.random.default_rng(0)
    for item in group.all_items():
        width, height = item.bucket
        suffix = f"_{height // 8}x{width // 8}"
        left, top = (item.resized_size[0] - width) // 2, (item.resized_size[1] - height) // 2
        latents = {
            "latents" + suffix: rng.standard_normal((16, height // 8, width // 8)).astype(np.float32),
            "original_size" + suffix: np.array((item.size[0], item.size[1])),
            "crop_ltrb" + suffix: np.array((left, top, left + width, top + height)),
            "latents_flipped" + suffix: rng.standard_normal((16, height // 8, width // 8)).astype(np.float32),
            "alpha_mask" + suffix: rng.random((height, width)).astype(np.float32),
        }
        np.savez(str(item.path.with_suffix("")) + f"_{item.size[0]:04d}x{item.size[1]:04d}_flux.npz", **latents)
        text = {
            "l_pooled": rng.standard_normal(4).astype(np.float32),
            "t5_out": rng.standard_normal((8, 4)).astype(np.float32),
            "txt_ids": np.zeros((8, 3), dtype=np.float32),
            "t5_attn_mask": np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=np.int64),
        }
        np.savez(str(item.path.with_suffix("")) + "_flux_te.npz", **text, apply_t5_attn_mask=apply_t5_attn_mask)
        written[str(item.path)] = {**{k[: -len(suffix)]: v for k, v in latents.items()}, **text}
    return written


def test_upstream_written_caches_are_used_without_encoding(tmp_path: Path):
    extra = "flip_aug = true\n  alpha_mask = true"
    written = write_upstream_caches(make_group(tmp_path, extra))
    group = make_group(tmp_path, extra, cache_latents=True, cache_latents_to_disk=True,
                       cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True)  # fmt: skip
    encoder, text = PoolEncoder(), UpstreamShapedText()
    assert group.cache_latents(encoder) == 0 and encoder.encoded == 0
    assert group.cache_text_encoder_outputs(text) == 0 and text.captions == []
    seen_flipped = set()
    for epoch in range(1, 9):
        for i in range(len(group)):
            batch = group[EpochPosition(epoch, i, 0)]
            cached = written[batch["image_paths"][0]]
            flipped = torch.equal(batch["latents"][0], torch.from_numpy(cached["latents_flipped"]))
            assert flipped or torch.equal(batch["latents"][0], torch.from_numpy(cached["latents"]))
            mask = cached["alpha_mask"][:, ::-1] if flipped else cached["alpha_mask"]
            assert torch.equal(batch["alpha_masks"][0], torch.from_numpy(mask.copy()))
            assert batch["crop_top_lefts"][0].tolist() == [cached["crop_ltrb"][1], cached["crop_ltrb"][0]]
            for key in ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask"):
                assert torch.equal(batch["text"][key][0], torch.from_numpy(cached[key]))
            seen_flipped.add(flipped)
    assert seen_flipped == {True, False}
    assert group.cache_text_encoder_outputs(UpstreamShapedText(apply_mask=True)) == 2  # the setting is compared


def test_the_validation_group_caches_like_the_training_group(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64), (96, 64)] * 3, [f"c{i}" for i in range(6)])
    make_group(tmp_path, "")  # writes the config over the 6 images
    config = (tmp_path / "d.toml").read_text().replace("batch_size = 1", "batch_size = 1\nvalidation_split = 0.5")
    (tmp_path / "d.toml").write_text(config)
    options = DatasetOptions(dataset_config=tmp_path / "d.toml", seed=0, cache_latents=True, cache_latents_to_disk=True,
                             cache_text_encoder_outputs=True, cache_text_encoder_outputs_to_disk=True)  # fmt: skip
    train, validation = build_dataset_groups(options)
    encoder, text = PoolEncoder(), CountingText()
    assert train.cache_latents(encoder) == 3 and validation.cache_latents(encoder) == 3
    assert train.cache_text_encoder_outputs(text) == 3 and validation.cache_text_encoder_outputs(text) == 3
    assert len(list((tmp_path / "img").glob("*_flux.npz"))) == 6 and len(set(text.captions)) == 6
    for i in range(len(validation)):
        batch = validation[i]
        assert batch["latents"].shape[1] == 16 and batch["images"] is None
        assert batch["text"]["l_pooled"][0, 0].item() == len(batch["captions"][0])
    again = build_dataset_groups(options)[1]
    assert again.cache_latents(PoolEncoder()) == 0 and again.cache_text_encoder_outputs(CountingText()) == 0
