"""The dataset group over generated images: folder and config styles, buckets per batch, multi-resolution,
regularization balance, reproducible order (also through data-loader workers), masks, metadata, --debug_dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from library.data import dataset as dataset_module
from library.data.dataset import DatasetOptions, EpochPosition, build_dataset_group, data_loader_workers
from library.data.debug import show_dataset
from library.errors import UserError
from tests.helpers import write_images, write_toml


def options(**kw) -> DatasetOptions:
    return DatasetOptions(**{"seed": 1, **kw})


def batches_of_epoch(group, epoch: int) -> list[list[str]]:
    return [group[EpochPosition(epoch, i, 0)]["image_paths"] for i in range(len(group))]


@pytest.fixture
def folder_style(tmp_path: Path) -> tuple[Path, Path]:
    train = tmp_path / "train"
    write_images(train / "2_sks dog", [(64, 64)] * 3, ["a photo of sks dog", None, "sks dog running"])
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)] * 5, [None] * 5)
    return train, tmp_path / "reg"


def test_folder_style_counts_captions_and_regularization_balance(folder_style, caplog):
    train, reg = folder_style
    fallbacks = {"resolution": 64, "batch_size": 2, "caption_extension": ".txt"}
    group = build_dataset_group(options(train_data_dir=train, reg_data_dir=reg, fallbacks=fallbacks,
                                        prior_loss_weight=0.5))  # fmt: skip
    assert group.num_train_images == 6  # 3 images x 2 repeats
    assert group.num_reg_images == 6  # 5 reg images, one repeated once more to match
    assert len(group) == 6  # 12 entries in one bucket, batch size 2
    assert "have no caption" in caplog.text
    captions, weights = {}, {}
    for i in range(len(group)):
        batch = group[EpochPosition(1, i, 0)]
        for path, caption, weight in zip(batch["image_paths"], batch["captions"], batch["loss_weights"].tolist()):
            captions[path], weights[path] = caption, weight
    assert captions[str(train / "2_sks dog" / "img001.png")] == "sks dog"  # class tokens stand in
    assert captions[str(train / "2_sks dog" / "img000.png")] == "a photo of sks dog"
    assert captions[str(reg / "1_dog" / "img000.png")] == "dog"
    assert weights[str(reg / "1_dog" / "img000.png")] == 0.5 and weights[str(train / "2_sks dog" / "img000.png")] == 1


def test_every_batch_is_one_bucket_and_multi_resolution_trains_each(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64), (128, 64), (64, 128), (96, 96), (128, 64)])
    config = write_toml(
        tmp_path / "data.toml",
        f"""
[general]
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 256
bucket_reso_steps = 16
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  num_repeats = 3
[[datasets]]
resolution = [128, 128]
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
""",
    )
    group = build_dataset_group(options(dataset_config=config))
    assert len(group.datasets) == 2
    sizes_seen = set()
    for index in range(len(group)):
        batch = group[EpochPosition(1, index, 0)]
        images = batch["images"]
        assert images.ndim == 4 and images.shape[1] == 3
        assert images.min() >= -1 and images.max() <= 1
        h, w = images.shape[-2:]
        assert h % 16 == 0 and w % 16 == 0
        assert (batch["target_sizes_hw"] == torch.tensor([h, w])).all()
        sizes_seen.add((w * h <= 64 * 64 + 1e-6, images.shape[0]))
    assert (True, 2) in sizes_seen or (True, 1) in sizes_seen  # the 64 px dataset
    assert (False, 1) in sizes_seen  # the 128 px dataset, batch size 1
    wide = [group[EpochPosition(1, i, 0)] for i in range(len(group))]
    assert any(b["images"].shape[-1] > b["images"].shape[-2] for b in wide)  # a landscape bucket exists
    assert "datasets[1]" in group.summary() and "128x128" in group.summary()


def test_order_is_reproducible_per_seed_and_epoch(folder_style):
    train, _ = folder_style
    fallbacks = {"resolution": 64, "batch_size": 1, "caption_extension": ".txt"}
    a = build_dataset_group(options(train_data_dir=train, fallbacks=fallbacks))
    b = build_dataset_group(options(train_data_dir=train, fallbacks=fallbacks))
    assert batches_of_epoch(a, 1) == batches_of_epoch(b, 1)
    assert batches_of_epoch(a, 1) != batches_of_epoch(a, 2)
    c = build_dataset_group(options(train_data_dir=train, fallbacks=fallbacks, seed=2))
    assert [batches_of_epoch(c, e) for e in (1, 2, 3)] != [batches_of_epoch(a, e) for e in (1, 2, 3)]
    a.set_current_epoch(2)
    assert [a[i]["image_paths"] for i in range(len(a))] == batches_of_epoch(a, 2)


@pytest.mark.parametrize("persistent", [False, True])
def test_loader_workers_see_the_current_epoch(folder_style, persistent: bool):
    train, _ = folder_style
    fallbacks = {"resolution": 64, "batch_size": 2, "caption_extension": ".txt", "flip_aug": True,
                 "shuffle_caption": True}  # fmt: skip
    group = build_dataset_group(options(train_data_dir=train, fallbacks=fallbacks))
    loader = DataLoader(group, batch_size=1, sampler=group.sampler(), collate_fn=lambda b: b[0], num_workers=2,
                        persistent_workers=persistent)  # fmt: skip
    for epoch in (1, 2):
        group.set_current_epoch(epoch)
        got = list(loader)
        expected = [group[EpochPosition(epoch, i, 0)] for i in range(len(group))]
        assert [b["image_paths"] for b in got] == [b["image_paths"] for b in expected]
        assert all(torch.equal(x["images"], y["images"]) for x, y in zip(got, expected))  # same flips too


def test_alpha_mask_becomes_the_loss_mask(tmp_path: Path):
    paths = write_images(tmp_path / "img", [(64, 64)], mode="RGBA")
    alpha = np.asarray(Image.open(paths[0]))[..., 3].astype(np.float32) / 255
    config = write_toml(
        tmp_path / "d.toml",
        f"""
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  alpha_mask = true
  caption_extension = ".txt"
""",
    )
    batch = build_dataset_group(options(dataset_config=config))[EpochPosition(1, 0, 0)]
    assert batch["alpha_masks"].shape == (1, 64, 64)
    np.testing.assert_allclose(batch["alpha_masks"][0].numpy(), alpha, atol=1 / 255)


def test_masked_loss_conditioning_images_follow_the_crop_and_need_masked_loss(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64), (64, 64)])
    masks = tmp_path / "mask"
    masks.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (255 if i else 0, 0, 0)).save(masks / f"img{i:03d}.png")
    config = write_toml(
        tmp_path / "d.toml",
        f"""
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  conditioning_data_dir = '{masks}'
  caption_extension = ".txt"
""",
    )
    with pytest.raises(UserError, match="--masked_loss"):
        build_dataset_group(options(dataset_config=config))
    group = build_dataset_group(options(dataset_config=config, masked_loss=True))
    for i in range(len(group)):
        batch = group[EpochPosition(1, i, 0)]
        red = batch["conditioning_images"][0, 0]
        expected = 1.0 if batch["image_paths"][0].endswith("img001.png") else -1.0
        assert torch.allclose(red, torch.full_like(red, expected), atol=1e-3)


def test_metadata_follows_upstream_keys(tmp_path: Path, folder_style):
    train, reg = folder_style
    fallbacks = {"resolution": 64, "batch_size": 2, "caption_extension": ".txt"}
    meta = build_dataset_group(options(train_data_dir=train, reg_data_dir=reg, fallbacks=fallbacks)).metadata()
    assert meta["ss_num_train_images"] == 6 and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_sks dog": {"n_repeats": 2, "img_count": 3}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 5}}
    tags = json.loads(meta["ss_tag_frequency"])["2_sks dog"]
    assert tags["a photo of sks dog"] == 1 and tags["sks dog"] == 1
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"]["resolution"] == [64, 64]
    write_images(tmp_path / "c", [(64, 64)])
    config = write_toml(tmp_path / "c.toml", f"[[datasets]]\nresolution = 64\nbatch_size = 1\n"
                        f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'c'}'\n")  # fmt: skip
    datasets = json.loads(build_dataset_group(options(dataset_config=config)).metadata()["ss_datasets"])
    assert datasets[0]["resolution"] == [64, 64] and datasets[0]["subsets"][0]["image_dir"] == "c"


@pytest.mark.parametrize("key", ["flip_aug", "random_crop"])
def test_augmentations_vary_by_epoch_and_are_reproducible(tmp_path: Path, key: str):
    write_images(tmp_path / "img", [(96, 64)])
    config = write_toml(
        tmp_path / "d.toml",
        f"""
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  {key} = true
""",
    )
    group = build_dataset_group(options(dataset_config=config))
    batches = [group[EpochPosition(e, 0, 0)] for e in range(1, 25)]
    assert torch.equal(batches[0]["images"], group[EpochPosition(1, 0, 0)]["images"])
    if key == "random_crop":  # the 96x64 image covers 64x64 and is cropped at several offsets
        assert len({tuple(b["crop_top_lefts"][0].tolist()) for b in batches}) > 3
    else:  # centre crop, mirrored about half the time
        first = batches[0]["images"][0]
        flipped = [not torch.equal(b["images"][0], first) for b in batches]
        assert 4 < sum(flipped) < 20
        assert all(torch.equal(b["images"][0], first.flip(-1)) for b, f in zip(batches, flipped) if f)


def test_no_images_and_no_source_are_clear_errors(tmp_path: Path):
    (tmp_path / "1_empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        build_dataset_group(options(train_data_dir=tmp_path, fallbacks={"resolution": 64}))
    with pytest.raises(UserError, match="--dataset_config or --train_data_dir"):
        build_dataset_group(options())


def test_resolution_must_suit_the_latent_grid(tmp_path: Path):
    write_images(tmp_path / "1_x", [(64, 64)])
    with pytest.raises(UserError, match="multiple of 16"):
        build_dataset_group(options(train_data_dir=tmp_path, fallbacks={"resolution": 72}))


def test_debug_dataset_shows_captions_and_saves_images(tmp_path: Path):
    write_images(tmp_path / "train" / "1_sks", [(64, 64)] * 2, ["sks, red, blue", "sks, green"])
    fallbacks = {"resolution": 64, "batch_size": 1, "caption_extension": ".txt", "caption_prefix": "photo of"}
    group = build_dataset_group(options(train_data_dir=tmp_path / "train", fallbacks=fallbacks))
    lines: list[str] = []
    assert show_dataset(group, tmp_path / "debug", out=lines.append) == 2
    text = "\n".join(lines)
    assert "photo of sks, red, blue" in text and "bucket 64x64" in text
    saved = sorted((tmp_path / "debug").glob("*.png"))
    assert len(saved) == 2 and Image.open(saved[0]).size == (64, 64)


def test_finetune_metadata_json_and_jsonl(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64)] * 2, [None, None])
    (tmp_path / "meta.json").write_text(json.dumps({
        "img000": {"caption": "a cat", "tags": "cute, small"}, "img001.png": {"tags": "dog"},
    }), encoding="utf-8")  # fmt: skip
    (tmp_path / "meta.jsonl").write_text(
        json.dumps({"image_path": str(tmp_path / "img" / "img000.png"), "caption": "jsonl caption"}) + "\n",
        encoding="utf-8",
    )
    for name, expected in (("meta.json", {"a cat,cute, small", "dog"}), ("meta.jsonl", {"jsonl caption"})):
        config = write_toml(
            tmp_path / "d.toml",
            f"""
[[datasets]]
resolution = 64
batch_size = 1
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  metadata_file = '{tmp_path / name}'
""",
        )
        group = build_dataset_group(options(dataset_config=config))
        assert {group[EpochPosition(1, i, 0)]["captions"][0] for i in range(len(group))} == expected


def test_random_state_is_untouched(folder_style):
    train, _ = folder_style
    fallbacks = {"resolution": 64, "batch_size": 1, "caption_extension": ".txt", "flip_aug": True}
    group = build_dataset_group(options(train_data_dir=train, fallbacks=fallbacks))
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    _ = [group[EpochPosition(1, i, 0)] for i in range(len(group))]
    assert (random.random(), torch.rand(1)) == expected


def test_diff_output_preservation_flags_its_samples(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64)] * 2)
    write_images(tmp_path / "reg", [(64, 64)] * 2, [None, "a dog on grass"])
    config = write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  class_tokens = "dog"
  is_reg = true
  custom_attributes.diff_output_preservation = true
""")  # fmt: skip
    group = build_dataset_group(options(dataset_config=config, prior_loss_weight=10.0))
    (batch,) = [group[EpochPosition(1, i, 0)] for i in range(len(group))]
    is_reg = torch.tensor(["/reg/" in p for p in batch["image_paths"]])
    assert batch["diff_output_preservation"].dtype == torch.bool and is_reg.sum() == 2
    assert torch.equal(batch["diff_output_preservation"], is_reg)
    assert torch.equal(batch["loss_weights"], torch.where(is_reg, 10.0, 1.0))
    assert [bool(a) for a in batch["custom_attributes"]] == is_reg.tolist()
    assert {c for c, r in zip(batch["captions"], is_reg) if r} == {"dog", "a dog on grass"}  # the subset's captions
    lines: list[str] = []
    show_dataset(group, out=lines.append)
    assert sum("custom attributes {'diff_output_preservation': True}" in line for line in lines) == 2


def test_data_loader_workers_capped_at_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(dataset_module.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [data_loader_workers(n) for n in (8, 2, 1, 0, -1)] == [2, 2, 1, 0, 0]
    monkeypatch.delattr(dataset_module.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(dataset_module.os, "cpu_count", lambda: 3)
    assert data_loader_workers(8) == 3
    monkeypatch.setattr(dataset_module.os, "cpu_count", lambda: None)
    assert data_loader_workers(8) == 1


def test_processes_split_each_global_batch_as_one_process_with_the_whole_batch(tmp_path: Path):
    """N processes with batch size b see, between them, exactly the batches one process with batch size N*b sees,
    with the same per-sample captions and keys; a process left without a sample gets a zero-weight copy, and each
    part's loss denominator makes the processes' average the global batch's mean."""
    write_images(tmp_path / "img", [(64, 64)] * 5 + [(192, 64)] * 3, [f"photo {i}" for i in range(8)])

    def group(batch_size: int, processes: int, index: int):
        config = write_toml(tmp_path / f"d{batch_size}.toml", f"""
            [general]
            shuffle_caption = true
            caption_extension = ".txt"
            enable_bucket = true
            min_bucket_reso = 64
            max_bucket_reso = 256
            [[datasets]]
            resolution = [128, 128]
            batch_size = {batch_size}
            [[datasets.subsets]]
            image_dir = '{tmp_path / "img"}'
            """)  # fmt: skip
        g = build_dataset_group(options(dataset_config=config))
        g.shard(processes, index)
        return g

    whole = group(2, 1, 0)
    parts = [group(1, 2, r) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 5  # buckets of 5 and 3: 3 + 2 global batches of 2
    for epoch in (1, 2):
        for i in range(len(whole)):
            one = whole[EpochPosition(epoch, i, 0)]
            split = [p[EpochPosition(epoch, i, 0)] for p in parts]
            split = [b for b in split if not b["padding"]] + [{k: [] for k in one} for b in split if b["padding"]]
            assert split[0]["image_paths"] + split[1]["image_paths"] == one["image_paths"]
            assert split[0]["captions"] + split[1]["captions"] == one["captions"]
            assert split[0]["sample_keys"] + split[1]["sample_keys"] == one["sample_keys"]
            assert all(p[EpochPosition(epoch, i, 0)]["loss_denominator"] == len(one["image_paths"]) / 2 for p in parts)
    three = [group(1, 3, r) for r in range(3)]  # global batches of 3: the bucket of 5 ends with a batch of 2
    parts = [[p[EpochPosition(1, i, 0)] for p in three] for i in range(len(three[0]))]
    short = [batch for batch in parts if any(b["padding"] for b in batch)]  # 2 samples and a zero-weight copy
    assert len(short) == 1 and [b["loss_weights"].tolist() for b in short[0]] == [[0.0], [1.0], [1.0]]
    assert [b["loss_denominator"] for b in short[0]] == [2 / 3] * 3
