from __future__ import annotations

import json

import pytest

from library.errors import UserError
from library.training.sample_prompts import SamplePrompt, load_sample_prompts, sample_image_name


def test_txt_lines_with_every_option(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# a comment\n\na cat --w 768 --h 512 --d 42 --s 30 --l 4.5 --g 2.0 --n blurry, low quality\nplain prompt\n",
        encoding="utf-8",
    )
    first, second = load_sample_prompts(path)
    assert first == SamplePrompt(0, "a cat", "blurry, low quality", 768, 512, 42, 30, 4.5, 2.0)
    assert second == SamplePrompt(1, "plain prompt")


def test_toml_defaults_and_subsets(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text(
        '[prompt]\nwidth = 640\nsample_steps = 8\n[[prompt.subset]]\nprompt = "a dog"\nseed = 3\n'
        '[[prompt.subset]]\nprompt = "a bird"\nwidth = 320\n',
        encoding="utf-8",
    )
    prompts = load_sample_prompts(path)
    assert [(p.prompt, p.width, p.sample_steps, p.seed) for p in prompts] == [
        ("a dog", 640, 8, 3),
        ("a bird", 320, 8, None),
    ]


def test_json_strings_and_objects(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["x --d 5", {"prompt": "y", "guidance_scale": 1.0}]), encoding="utf-8")
    prompts = load_sample_prompts(path)
    assert prompts[0].seed == 5 and prompts[1].guidance_scale == 1.0 and prompts[1].index == 1


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("p.txt", "a cat --q 3\n", "unknown sample option '--q'"),
        ("p.txt", "a cat --w wide\n", "'--w wide' is not a valid int"),
        ("p.txt", "# only a comment\n", "no prompts"),
        ("p.toml", "[prompt\n", "cannot read prompts"),
        ("p.json", '[{"prompt": "x", "colour": 1}]', "unknown key 'colour'"),
        ("p.json", '[{"width": 64}]', "has no 'prompt'"),
        ("p.txt", "a cat --w 8\n", "width/height must be >= 16"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message) as error:
        load_sample_prompts(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="--sample_prompts .*missing.txt: file not found"):
        load_sample_prompts(tmp_path / "missing.txt")


def test_image_names_as_upstream():
    prompt = SamplePrompt(3, "x", seed=42)
    assert (
        sample_image_name("lora", prompt, epoch=2, step=10, stamp="20260101120000")
        == "lora_e000002_03_20260101120000_42.png"
    )
    assert sample_image_name(None, SamplePrompt(0, "x"), epoch=None, step=100, stamp="T") == "000100_00_T.png"
