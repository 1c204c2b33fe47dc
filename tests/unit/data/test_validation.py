"""validation_split / validation_seed: upstream's choice of held-out images, a validation group beside the training
group that never changes between passes, regularization images kept out, and the command-line options."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import pytest
import torch

from library.data.dataset import (
    DatasetOptions,
    EpochPosition,
    add_dataset_args,
    add_validation_args,
    build_dataset_group,
    build_dataset_groups,
)  # fmt: skip
from library.data.items import split_for_validation
from library.errors import UserError
from tests.helpers import write_images, write_toml


def upstream_split(paths: list[str], split: float, seed: int) -> tuple[list[str], list[str]]:
    """upstream's train_util.split_train_val as it runs: the global RNG seeded, the list shuffled, training the
    first ceil(n * (1 - split)), validation the last round(n * split)."""
    state = random.getstate()
    random.seed(seed)
    shuffled = list(paths)
    random.shuffle(shuffled)
    random.setstate(state)
    return shuffled[: math.ceil(len(paths) * (1 - split))], shuffled[len(paths) - round(len(paths) * split) :]


def paths_of(group) -> set[str]:
    return {str(item.path) for item in group.all_items()}


def dataset_config(tmp_path: Path, dataset: str = "", subset: str = "", general: str = "") -> Path:
    return write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
{general}
[[datasets]]
resolution = 64
batch_size = 2
{dataset}
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  num_repeats = 3
  {subset}
""")  # fmt: skip


@pytest.mark.parametrize(("n", "split", "seed"), [(10, 0.2, 42), (10, 0.3, 7), (7, 0.5, 1), (5, 1.0, 3)])
def test_held_out_images_are_upstreams(n: int, split: float, seed: int):
    names = [f"img{i:03d}.png" for i in range(n)]
    train, held = split_for_validation(names, split, seed)
    upstream_train, upstream_held = upstream_split(names, split, seed)
    assert held == sorted(upstream_held)  # the same images, in folder order
    assert set(train) == set(names) - set(held) and set(train) <= set(upstream_train)


def test_upstreams_overlap_is_not_copied():
    names = [f"img{i}.png" for i in range(3)]
    upstream_train, upstream_held = upstream_split(names, 0.5, 0)
    assert set(upstream_train) & set(upstream_held)  # upstream trains on one of its validation images
    train, held = split_for_validation(names, 0.5, 0)
    assert not set(train) & set(held) and len(held) == 2 and len(train) == 1


def test_config_split_makes_a_validation_group(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64)] * 10)
    config = dataset_config(tmp_path, "validation_split = 0.2\nvalidation_seed = 42")
    train, validation = build_dataset_groups(DatasetOptions(dataset_config=config, seed=5))
    _, upstream_held = upstream_split([str(tmp_path / "img" / f"img{i:03d}.png") for i in range(10)], 0.2, 42)
    assert paths_of(validation) == set(upstream_held)
    assert paths_of(train) == {str(p) for p in (tmp_path / "img").glob("*.png")} - set(upstream_held)
    assert train.num_train_images == 8 * 3 and validation.num_train_images == 2  # one repeat each, as upstream
    assert len(validation) == 1 and validation[0]["latents"] is None and validation[0]["images"].shape == (2, 3, 64, 64)
    assert "(validation)" in validation.summary()
    assert paths_of(build_dataset_group(DatasetOptions(dataset_config=config, seed=5))) == paths_of(train)


def test_the_training_seed_chooses_without_validation_seed(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64)] * 10)
    config = dataset_config(tmp_path, "validation_split = 0.3")
    held = {seed: paths_of(build_dataset_groups(DatasetOptions(dataset_config=config, seed=seed))[1])
            for seed in (1, 2)}  # fmt: skip
    _, upstream_held = upstream_split([str(tmp_path / "img" / f"img{i:03d}.png") for i in range(10)], 0.3, 1)
    assert held[1] == set(upstream_held) and held[1] != held[2]


def test_no_split_no_validation_group(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64)] * 4)
    train, validation = build_dataset_groups(DatasetOptions(dataset_config=dataset_config(tmp_path), seed=0))
    assert validation is None and train.num_train_images == 12


def test_split_one_and_regularization_images(tmp_path: Path, caplog):
    write_images(tmp_path / "img", [(64, 64)] * 4)
    write_images(tmp_path / "reg", [(64, 64)] * 6, [None] * 6)
    write_images(tmp_path / "all", [(64, 64)] * 3)
    config = write_toml(tmp_path / "d.toml", f"""
[general]
caption_extension = ".txt"
resolution = 64
[[datasets]]
validation_split = 0.5
  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  class_tokens = "dog"
  is_reg = true
[[datasets]]
validation_split = 1.0
  [[datasets.subsets]]
  image_dir = '{tmp_path / "all"}'
""")  # fmt: skip
    train, validation = build_dataset_groups(DatasetOptions(dataset_config=config, seed=0))
    assert not any(item.is_reg for item in validation.all_items())  # never held out, never validated
    assert train.num_train_images == 2 and train.num_reg_images == 2  # balanced against the 2 kept images
    assert paths_of(validation) >= {str(p) for p in (tmp_path / "all").glob("*.png")}
    assert len([p for p in paths_of(validation) if "/img/" in p]) == 2
    assert train.datasets[1].num_batches == 0 and validation.num_train_images == 5
    only_reg = write_toml(tmp_path / "r.toml", f"""
[[datasets]]
resolution = 64
validation_split = 1.0
  [[datasets.subsets]]
  image_dir = '{tmp_path / "all"}'
  [[datasets.subsets]]
  image_dir = '{tmp_path / "reg"}'
  is_reg = true
""")  # fmt: skip
    with pytest.raises(UserError, match="validation_split holds out every training image"):
        build_dataset_groups(DatasetOptions(dataset_config=only_reg, seed=0))
    assert "regularization images are not used either" in caplog.text


def test_validation_batches_never_change_and_captions_are_not_augmented(tmp_path: Path):
    write_images(tmp_path / "img", [(64, 64), (96, 64)] * 4, [f"a{i}, b{i}, c{i}, d{i}" for i in range(8)])
    config = dataset_config(tmp_path, "validation_split = 0.5\nvalidation_seed = 3",
                            "shuffle_caption = true\ncaption_tag_dropout_rate = 0.5\ncaption_dropout_rate = 0.5\n"
                            "flip_aug = true", "enable_bucket = true\nmin_bucket_reso = 32\nbucket_reso_steps = 16")  # fmt: skip
    train, validation = build_dataset_groups(DatasetOptions(dataset_config=config, seed=0))
    first = [validation[i] for i in range(len(validation))]
    validation.set_current_epoch(7)
    validation.set_current_step(100)
    again = [validation[i] for i in range(len(validation))]
    loader = list(torch.utils.data.DataLoader(validation, batch_size=1, sampler=validation.sampler(),
                                              collate_fn=lambda b: b[0]))  # fmt: skip
    for batches in (again, loader):
        assert [b["image_paths"] for b in batches] == [b["image_paths"] for b in first]
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(batches, first))
    for batch in first:
        for path, caption in zip(batch["image_paths"], batch["captions"]):
            i = int(Path(path).stem[3:])
            assert caption == f"a{i}, b{i}, c{i}, d{i}"  # as written: no shuffle, no dropout
    captions = {c for e in (1, 2, 3) for i in range(len(train)) for c in train[EpochPosition(e, i, 0)]["captions"]}
    assert "" in captions or any(c.count(",") < 3 for c in captions)  # training still drops tags / captions


def test_command_line_options_reach_folder_style_datasets(tmp_path: Path):
    write_images(tmp_path / "train" / "2_sks dog", [(64, 64)] * 8)
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    add_validation_args(parser)
    argv = ["--train_data_dir", str(tmp_path / "train"), "--resolution", "64", "--caption_extension", ".txt"]
    args = parser.parse_args([*argv, "--validation_split", "0.25", "--validation_seed", "9"])
    args.seed, args.prior_loss_weight, args.masked_loss = 1, 1.0, False
    train, validation = build_dataset_groups(DatasetOptions.from_args(args))
    names = [str(tmp_path / "train" / "2_sks dog" / f"img{i:03d}.png") for i in range(8)]
    assert paths_of(validation) == set(upstream_split(names, 0.25, 9)[1])
    assert train.num_train_images == 6 * 2
    args = parser.parse_args(argv)
    args.seed, args.prior_loss_weight, args.masked_loss = 1, 1.0, False
    assert args.validation_split == 0.0 and build_dataset_groups(DatasetOptions.from_args(args))[1] is None
    args.validation_split = 1.5
    with pytest.raises(UserError, match=r"--validation_split 1.5: expected a number in \[0, 1\]"):
        build_dataset_groups(DatasetOptions.from_args(args))
