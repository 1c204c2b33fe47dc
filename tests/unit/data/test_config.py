"""Dataset configs: upstream's README example, precedence, folder style, json, and every bad-config case as one
clear error naming the file, the table and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from library.data.config import configs_from_folders, load_dataset_config
from library.errors import UserError
from tests.helpers import write_images, write_toml

README = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "upstream-readme.txt"

# the multi-resolution example from upstream's README, verbatim but for the image folder
README_EXAMPLE = """
[general]
# define common settings here
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"

[[datasets]]
# define the first resolution here
batch_size = 2
enable_bucket = true
resolution = [1024, 1024]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1

[[datasets]]
# define the second resolution here
batch_size = 3
enable_bucket = true
resolution = [768, 768]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1

[[datasets]]
# define the third resolution here
batch_size = 4
enable_bucket = true
resolution = [512, 512]

  [[datasets.subsets]]
  image_dir = "path/to/image/dir"
  num_repeats = 1
"""


@pytest.fixture
def images(tmp_path: Path) -> Path:
    write_images(tmp_path / "img", [(64, 64)])
    return tmp_path / "img"


def config(tmp_path: Path, body: str, name: str = "d.toml") -> Path:
    return write_toml(tmp_path / name, body)


def test_the_readme_example_parses_into_three_resolutions(tmp_path: Path, images: Path):
    if README.is_file():  # the example above is the README's own text
        readme = README.read_text(encoding="utf-8")
        for line in README_EXAMPLE.strip().splitlines():
            assert line.strip() in readme, line
    path = config(tmp_path, README_EXAMPLE.replace("path/to/image/dir", str(images)))
    datasets = load_dataset_config(path)
    assert [(d.resolution, d.batch_size) for d in datasets] == [((1024, 1024), 2), ((768, 768), 3), ((512, 512), 4)]
    for d in datasets:
        assert d.enable_bucket and d.kind == "dreambooth" and d.where == f"{path}: datasets[{datasets.index(d)}]"
        (subset,) = d.subsets
        assert subset.image_dir == images and subset.flip_aug and not subset.color_aug
        assert subset.caption.keep_tokens_separator == "|||" and subset.caption_extension == ".txt"


def test_precedence_subset_dataset_general_command_line_default(tmp_path: Path, images: Path):
    path = config(
        tmp_path,
        f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_prefix = "general"
[[datasets]]
resolution = 64
keep_tokens = 2
  [[datasets.subsets]]
  image_dir = '{images}'
  keep_tokens = 3
  [[datasets.subsets]]
  image_dir = '{images}'
""",
    )
    fallbacks = {"keep_tokens": 9, "caption_prefix": "cli", "caption_suffix": "cli suffix", "batch_size": 5,
                 "flip_aug": True}  # fmt: skip
    (d,) = load_dataset_config(path, fallbacks)
    first, second = d.subsets
    assert first.caption.keep_tokens == 3 and second.caption.keep_tokens == 2  # subset, then dataset
    assert first.caption.caption_prefix == "general" and first.caption.shuffle_caption  # general beats command line
    assert first.caption.caption_suffix == "cli suffix" and first.flip_aug and d.batch_size == 5  # command line
    assert first.num_repeats == 1 and first.caption_extension == ".caption" and d.bucket_reso_steps == 64  # defaults


def test_json_config_and_relative_paths(tmp_path: Path, images: Path, monkeypatch):
    data = {"general": {"resolution": [64, 48]}, "datasets": [{"subsets": [{"image_dir": "img", "num_repeats": 2}]}]}
    (tmp_path / "d.json").write_text(json.dumps(data), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    (d,) = load_dataset_config(Path("d.json"))
    assert d.resolution == (64, 48) and d.subsets[0].num_repeats == 2 and d.subsets[0].image_dir.resolve() == images
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not below the working folder: found beside the config file
    (d,) = load_dataset_config(tmp_path / "d.json")
    assert d.subsets[0].image_dir == tmp_path / "img"


def test_every_documented_key_is_accepted(tmp_path: Path, images: Path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}", encoding="utf-8")
    path = config(
        tmp_path,
        f"""
[general]
shuffle_caption = true
caption_separator = ","
keep_tokens = 1
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
caption_prefix = "p"
caption_suffix = "s"
caption_dropout_rate = 0.1
caption_dropout_every_n_epochs = 3
caption_tag_dropout_rate = 0.2
token_warmup_min = 2
token_warmup_step = 0.5
flip_aug = true
color_aug = true
random_crop = true
face_crop_aug_range = [2.0, 4.0]
resize_interpolation = "bicubic"
custom_attributes = {{ style = "ink" }}
cache_info = true
alpha_mask = true
[[datasets]]
resolution = [512, 384]
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = true
network_multiplier = 0.5
  [[datasets.subsets]]
  image_dir = '{images}'
  num_repeats = 3
  caption_extension = ".txt"
  class_tokens = "sks"
  is_reg = false
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{images}'
  metadata_file = '{meta}'
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = '{images}'
  conditioning_data_dir = '{images}'
""",
    )
    dreambooth, finetune, controlnet = load_dataset_config(path)
    assert (dreambooth.kind, finetune.kind, controlnet.kind) == ("dreambooth", "finetune", "controlnet")
    s = dreambooth.subsets[0]
    assert s.caption.token_warmup_step == 0.5 and s.face_crop_aug_range == (2.0, 4.0)
    assert s.custom_attributes == {"style": "ink"} and s.network_multiplier == 0.5 and s.class_tokens == "sks"
    assert dreambooth.bucket_no_upscale and dreambooth.resolution == (512, 384)
    assert finetune.subsets[0].metadata_file == meta and controlnet.subsets[0].conditioning_data_dir == images


def _bucket_config(tmp_path: Path, images: Path, dataset: str) -> Path:
    return config(
        tmp_path, f"[[datasets]]\nenable_bucket = true\n{dataset}\n[[datasets.subsets]]\nimage_dir = '{images}'\n"
    )


def test_bucket_range_is_rounded_as_upstream_min_down_max_up(tmp_path: Path, images: Path, caplog):
    path = _bucket_config(tmp_path, images, "resolution = 512\nmin_bucket_reso = 250\nmax_bucket_reso = 1000")
    (d,) = load_dataset_config(path)
    assert (d.min_bucket_reso, d.max_bucket_reso) == (192, 1024)
    assert "min_bucket_reso 250 -> 192" in caplog.text and "max_bucket_reso 1000 -> 1024" in caplog.text
    assert str(path) in caplog.text and "datasets[0]" in caplog.text


@pytest.mark.parametrize(("dataset", "limits"), [
    ("resolution = 1000\nmax_bucket_reso = 1000", (256, 1024)),  # upstream accepts it: max rounds up to 1024
    ("resolution = 1000\nmin_bucket_reso = 1000\nmax_bucket_reso = 1000", (960, 1024)),
    ("resolution = [1000, 744]\nmin_bucket_reso = 744\nmax_bucket_reso = 1000\nbucket_reso_steps = 32", (736, 1024)),
    ("resolution = 1024\nmax_bucket_reso = 1024", (256, 1024)),  # multiples stay as they are
])  # fmt: skip
def test_configs_upstream_accepts_are_accepted(tmp_path: Path, images: Path, dataset: str, limits, caplog):
    (d,) = load_dataset_config(_bucket_config(tmp_path, images, dataset))
    assert (d.min_bucket_reso, d.max_bucket_reso) == limits
    assert ("-> " in caplog.text) == (dataset != "resolution = 1024\nmax_bucket_reso = 1024")


def test_bucket_limits_upstream_refuses_are_one_line(tmp_path: Path, images: Path):
    with pytest.raises(
        UserError,
        match=r"datasets\[0\]: min_bucket_reso 32 rounds down to 0 with bucket_reso_steps "
        r"64; set min_bucket_reso to at least 64",
    ):
        load_dataset_config(_bucket_config(tmp_path, images, "resolution = 512\nmin_bucket_reso = 32"))
    with pytest.raises(UserError, match=r"resolution 1100x1100 is outside the bucket range \[256, 1024\]"):
        load_dataset_config(_bucket_config(tmp_path, images, "resolution = 1100\nmax_bucket_reso = 1000"))
    with pytest.raises(UserError, match=r"resolution 200x512 is outside the bucket range \[256, 1024\]"):
        load_dataset_config(_bucket_config(tmp_path, images, "resolution = [200, 512]"))


def test_bucket_no_upscale_says_the_limits_are_not_used(tmp_path: Path, images: Path, caplog):
    load_dataset_config(_bucket_config(tmp_path, images, "resolution = 512\nbucket_no_upscale = true"))
    assert "not used with bucket_no_upscale" not in caplog.text  # defaults: nothing to say
    load_dataset_config(_bucket_config(tmp_path, images, "resolution = 512\nbucket_no_upscale = true\n"
                                                         "max_bucket_reso = 2048"))  # fmt: skip
    assert "min_bucket_reso and max_bucket_reso are not used with bucket_no_upscale" in caplog.text


# upstream's docs/flux_train_network.md validation example, verbatim but for the image folders
VALIDATION_EXAMPLE = """
validation_seed = 42 # [Optional] Validation seed, otherwise uses training seed for validation split .
enable_bucket = true
resolution = [1024, 1024]

[[datasets]]
  [[datasets.subsets]]
  # This directory will use 100% of the images for training
  image_dir = "path/to/image/directory"

[[datasets]]
validation_split = 0.1 # Split between 0.0 and 1.0 where 1.0 will use the full subset as a validation dataset

  [[datasets.subsets]]
  # This directory will split 10% to validation and 90% to training
  image_dir = "path/to/image/second-directory"

[[datasets]]
validation_split = 1.0 # Will use this full subset as a validation subset.

  [[datasets.subsets]]
  # This directory will use the 100% to validation and 0% to training
  image_dir = "path/to/image/full_validation"
"""


def test_validation_keys_in_general_and_datasets(tmp_path: Path, images: Path):
    body = "[general]\n" + VALIDATION_EXAMPLE.replace("path/to/image/second-directory", str(images)).replace(
        "path/to/image/full_validation", str(images)).replace("path/to/image/directory", str(images))  # fmt: skip
    first, second, third = load_dataset_config(config(tmp_path, body))
    assert [d.validation_split for d in (first, second, third)] == [0.0, 0.1, 1.0]
    assert {d.validation_seed for d in (first, second, third)} == {42}
    write_images(tmp_path / "train" / "2_sks", [(64, 64)])
    (d,) = configs_from_folders(tmp_path / "train", fallbacks={"resolution": 64, "validation_split": 0.25})
    assert d.validation_split == 0.25 and d.validation_seed is None
    with pytest.raises(UserError, match=r"--validation_split 2: expected a number in \[0, 1\]"):
        configs_from_folders(tmp_path / "train", fallbacks={"resolution": 64, "validation_split": 2})


def test_custom_attributes_known_checked_unknown_warned(tmp_path: Path, images: Path, caplog):
    path = config(tmp_path, "[general]\ncustom_attributes = { style = \"ink\" }\n" + _dataset(
        images, subset="custom_attributes.diff_output_preservation = true\ncustom_attributes.weight = 2"))  # fmt: skip
    (d,) = load_dataset_config(path)
    (s,) = d.subsets
    assert s.diff_output_preservation and s.custom_attributes == {"diff_output_preservation": True, "weight": 2}
    assert "general: custom_attributes.style is not used" in caplog.text
    assert "datasets[0].subsets[0]: custom_attributes.weight is not used" in caplog.text
    assert "diff_output_preservation is not used" not in caplog.text
    caplog.clear()
    (d,) = load_dataset_config(config(tmp_path, _dataset(images)))
    assert not d.subsets[0].diff_output_preservation and not caplog.text


def _dataset(images: Path, dataset: str = "", subset: str = "") -> str:
    return f"[[datasets]]\nresolution = 512\n{dataset}\n[[datasets.subsets]]\nimage_dir = '{images}'\n{subset}\n"


BAD = [
    # (name, body(images), expected message pieces)
    ("unknown key", lambda i: _dataset(i, subset="num_repeat = 2"),
     ["datasets[0].subsets[0]", "unknown key 'num_repeat'", "did you mean 'num_repeats'"]),
    ("unknown general key", lambda i: "[general]\nflip_augs = true\n" + _dataset(i),
     ["general", "unknown key 'flip_augs'", "'flip_aug'"]),
    ("unknown top-level table", lambda i: "[genral]\nflip_aug = true\n" + _dataset(i), ["'genral'", "'general'"]),
    ("wrong type", lambda i: _dataset(i, subset='num_repeats = "10"'),
     ["datasets[0].subsets[0]", 'num_repeats = "10"', "expected a whole number"]),
    ("wrong bool", lambda i: _dataset(i, dataset="enable_bucket = 1"), ["datasets[0]", "enable_bucket", "true or false"]),
    ("range", lambda i: _dataset(i, subset="caption_dropout_rate = 1.5"), ["caption_dropout_rate = 1.5", "[0, 1]"]),
    ("bad resolution", lambda i: _dataset(i, dataset="").replace("resolution = 512", "resolution = [512]"),
     ["datasets[0]", "resolution = [512]", "[width, height]"]),
    ("missing required", lambda i: "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nnum_repeats = 2\n",
     ["datasets[0].subsets[0]", "image_dir is required"]),
    ("missing subsets", lambda i: "[[datasets]]\nresolution = 512\n", ["datasets[0]", "no [[datasets.subsets]]"]),
    ("no datasets", lambda i: "[general]\nflip_aug = true\n", ["no [[datasets]]"]),
    ("mixed kinds", lambda i: _dataset(i) + f"[[datasets.subsets]]\nmetadata_file = '{i}/m.json'\n",
     ["datasets[0]", "cannot mix kinds", "subsets[1] is fine-tune style"]),
    ("missing folder", lambda i: _dataset(i.parent / "nope"), ["datasets[0].subsets[0]", "image_dir", "nope does not exist"]),
    ("missing metadata file", lambda i: _dataset(i, subset=f"metadata_file = '{i}/none.json'"),
     ["datasets[0].subsets[0]", "metadata_file", "none.json does not exist"]),
    ("resolution outside buckets", lambda i: _dataset(i, dataset="enable_bucket = true\nmax_bucket_reso = 256"),
     ["datasets[0]", "resolution 512x512 is outside the bucket range [256, 256]"]),
    ("min above max", lambda i: _dataset(i, dataset="enable_bucket = true\nmin_bucket_reso = 1024\nmax_bucket_reso = 512"),
     ["min_bucket_reso 1024 is above max_bucket_reso 512"]),
    ("dataset key in subset", lambda i: _dataset(i, subset="batch_size = 2"),
     ["datasets[0].subsets[0]", "batch_size is a dataset setting"]),
    ("subset key in dataset", lambda i: _dataset(i, dataset="is_reg = true"), ["datasets[0]", "is_reg belongs in a"]),
    ("wrong kind key", lambda i: _dataset(i, subset=f"metadata_file = '{i}/m.json'\nis_reg = true"),
     ["datasets[0].subsets[0]", "is_reg cannot be set here", "fine-tune"]),
    ("validation_split range", lambda i: _dataset(i, dataset="validation_split = 1.5"),
     ["datasets[0]", "validation_split = 1.5", "expected a number in [0, 1]"]),
    ("validation_seed type", lambda i: "[general]\nvalidation_seed = 4.5\n" + _dataset(i),
     ["general", "validation_seed = 4.5", "whole number"]),
    ("validation_split in a subset", lambda i: _dataset(i, subset="validation_split = 0.1"),
     ["datasets[0].subsets[0]", "validation_split is a dataset setting"]),
    ("custom attribute type", lambda i: _dataset(i, subset="custom_attributes.diff_output_preservation = 1"),
     ["datasets[0].subsets[0]", "custom_attributes.diff_output_preservation = 1", "true or false"]),
    ("bad interpolation", lambda i: _dataset(i, subset='resize_interpolation = "fancy"'),
     ['resize_interpolation = "fancy"', "lanczos"]),
    ("bad face range", lambda i: _dataset(i, subset="face_crop_aug_range = [4.0, 2.0]"), ["low <= high"]),
    ("no resolution", lambda i: f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{i}'\n", ["resolution is not set"]),
    ("bad toml", lambda i: "[[datasets]]\nresolution = 512\nbatch_size = = 2\n", ["not valid TOML", "line 3"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "pieces"), BAD, ids=[b[0] for b in BAD])
def test_bad_configs_are_one_clear_error(tmp_path: Path, images: Path, name, body, pieces):
    (images / "m.json").write_text("{}", encoding="utf-8")
    path = config(tmp_path, body(images))
    with pytest.raises(UserError) as info:
        load_dataset_config(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for piece in pieces:
        assert piece in message, (piece, message)


def test_bad_json_and_missing_config_name_the_file(tmp_path: Path):
    (tmp_path / "d.json").write_text('{"datasets": [}', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "d.json")) + r" is not valid JSON: .* line 1"):
        load_dataset_config(tmp_path / "d.json")
    with pytest.raises(UserError, match="missing.toml does not exist"):
        load_dataset_config(tmp_path / "missing.toml")


def test_folder_style_reads_repeats_and_class_tokens(tmp_path: Path, caplog):
    write_images(tmp_path / "train" / "10_sks dog", [(64, 64)])
    write_images(tmp_path / "train" / "3_a_b", [(64, 64)])
    (tmp_path / "train" / "notes").mkdir()
    write_images(tmp_path / "reg" / "1_dog", [(64, 64)])
    (d,) = configs_from_folders(tmp_path / "train", tmp_path / "reg", fallbacks={"resolution": 64, "batch_size": 2})
    got = sorted((s.image_dir.name, s.num_repeats, s.class_tokens, s.is_reg) for s in d.subsets)
    assert got == [("10_sks dog", 10, "sks dog", False), ("1_dog", 1, "dog", True), ("3_a_b", 3, "a_b", False)]
    assert d.batch_size == 2 and "ignoring folder 'notes'" in caplog.text
    assert d.where == f"--train_data_dir {tmp_path / 'train'}"


def test_folder_style_errors(tmp_path: Path):
    write_images(tmp_path / "loose", [(64, 64)] * 2)
    with pytest.raises(UserError, match="2 images directly in it must go in a subfolder named like '10_sks'"):
        configs_from_folders(tmp_path / "loose", fallbacks={"resolution": 64})
    with pytest.raises(UserError, match="--train_data_dir .*missing does not exist"):
        configs_from_folders(tmp_path / "missing", fallbacks={"resolution": 64})
    write_images(tmp_path / "t" / "1_x", [(64, 64)])
    with pytest.raises(UserError, match="--train_batch_size 0: expected a whole number >= 1"):
        configs_from_folders(tmp_path / "t", fallbacks={"resolution": 64, "batch_size": 0})


def test_in_json_makes_one_fine_tune_subset(tmp_path: Path):
    write_images(tmp_path / "train", [(64, 64)])
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img000.png": {"caption": "x"}}), encoding="utf-8")
    (d,) = configs_from_folders(tmp_path / "train", in_json=meta, fallbacks={"resolution": [64, 48], "num_repeats": 3})
    (s,) = d.subsets
    assert d.kind == "finetune" and d.resolution == (64, 48)
    assert s.metadata_file == meta and s.image_dir == tmp_path / "train" and s.num_repeats == 3
    with pytest.raises(UserError, match="--in_json .*nope.json does not exist"):
        configs_from_folders(tmp_path / "train", in_json=tmp_path / "nope.json", fallbacks={"resolution": 64})
