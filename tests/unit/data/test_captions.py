"""Caption rules, one by one, in upstream's documented order: prefix/suffix, dropout, wildcards, keep tokens (count or
separator, twice), warm-up, shuffle, tag dropout, secondary separator."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from library.data.captions import CaptionOptions, process_caption, read_caption_file
from library.errors import UserError


def run(caption: str, n: int = 200, seed: int = 0, **kw) -> list[str]:
    options = CaptionOptions(**kw)
    rng = random.Random(seed)
    return [process_caption(caption, options, rng) for _ in range(n)]


def test_plain_caption_is_unchanged_and_first_line_only():
    assert run("a photo, of a dog", n=1) == ["a photo, of a dog"]
    assert run("line one\nline two", n=1) == ["line one"]


def test_prefix_and_suffix_wrap_the_caption():
    assert run("dog", n=1, caption_prefix="photo of", caption_suffix="best quality") == ["photo of dog best quality"]


def test_shuffle_keeps_the_first_keep_tokens_and_varies_the_rest():
    outs = run("sks, a, b, c, d, e", keep_tokens=1, shuffle_caption=True)
    assert all(o.startswith("sks, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted("sks, a, b, c, d, e".split(", ")) for o in outs)
    assert len(set(outs)) > 20


def test_keep_tokens_separator_twice_fixes_head_and_tail():
    caption = "1girl, hatsune miku ||| stage, mic, light, crowd ||| best quality, rating: general"
    outs = run(caption, keep_tokens_separator="|||", shuffle_caption=True)
    for out in outs:
        tokens = out.split(", ")
        assert tokens[:2] == ["1girl", "hatsune miku"]
        assert tokens[-2:] == ["best quality", "rating: general"]
        assert sorted(tokens[2:-2]) == ["crowd", "light", "mic", "stage"]
    assert len(set(outs)) > 10
    # without shuffling the separator is still removed (it is never meant for the text encoder)
    assert run(caption, n=1, keep_tokens_separator="|||") == [
        "1girl, hatsune miku, stage, mic, light, crowd, best quality, rating: general"
    ]


def test_custom_caption_separator_and_secondary_separator_groups():
    outs = run("sks| red;;;blue| green| tall", caption_separator="|", secondary_separator=";;;", shuffle_caption=True,
               keep_tokens=1)  # fmt: skip
    for out in outs:  # "red;;;blue" moves as one tag and becomes "red|blue"
        assert out.startswith("sks, ")
        assert "red|blue" in out and out.count("red") == 1
    assert len(set(outs)) > 3


def test_wildcards_pick_each_option_and_escape_braces():
    outs = run("a {red|green|blue} ball, {{literal}}", enable_wildcard=True, n=300)
    counts = Counter(outs)
    assert set(counts) == {f"a {c} ball, {{literal}}" for c in ("red", "green", "blue")}
    assert min(counts.values()) > 60


def test_multiline_captions_with_wildcards_pick_a_line():
    outs = set(run("first line\nsecond {x|y}\n\n", enable_wildcard=True, n=200))
    assert outs == {"first line", "second x", "second y"}


def test_caption_dropout_rate_empties_about_that_share():
    outs = run("a, b, c", caption_dropout_rate=0.3, n=2000)
    share = outs.count("") / len(outs)
    assert 0.25 < share < 0.35


def test_caption_dropout_every_n_epochs():
    options = CaptionOptions(caption_dropout_every_n_epochs=3)
    rng = random.Random(0)
    got = [process_caption("dog", options, rng, epoch=e) for e in range(1, 7)]
    assert got == ["dog", "dog", "", "dog", "dog", ""]


def test_tag_dropout_drops_flexible_tags_only():
    outs = run("keep, a, b, c, d, e, f, g, h", keep_tokens=1, caption_tag_dropout_rate=0.5, n=500)
    assert all(o.split(", ")[0] == "keep" for o in outs)
    kept = sum(len(o.split(", ")) - 1 for o in outs) / (500 * 8)
    assert 0.4 < kept < 0.6


def test_token_warmup_grows_the_caption_with_steps():
    options = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    lengths = [len(process_caption("a, b, c, d, e, f", options, random.Random(0), step=s).split(", "))
               for s in (0, 5, 9, 10, 50)]  # fmt: skip
    assert lengths == [1, 3, 5, 6, 6]
    ratio = CaptionOptions(token_warmup_min=2, token_warmup_step=0.5)  # half of max_train_steps
    got = process_caption("a, b, c, d, e, f", ratio, random.Random(0), step=0, max_train_steps=100)
    assert got == "a, b"
    assert process_caption("a, b, c, d, e, f", ratio, random.Random(0), step=50, max_train_steps=100).count(",") == 5


def test_same_seed_same_captions():
    kw = dict(shuffle_caption=True, caption_tag_dropout_rate=0.2, enable_wildcard=True)
    assert run("a, b, {c|d}, e, f", seed=3, **kw) == run("a, b, {c|d}, e, f", seed=3, **kw)
    assert run("a, b, {c|d}, e, f", seed=3, **kw) != run("a, b, {c|d}, e, f", seed=4, **kw)


def test_varies_tells_when_text_encoder_outputs_can_be_cached():
    assert not CaptionOptions(keep_tokens=2, caption_prefix="x").varies
    for key, value in (("shuffle_caption", True), ("caption_dropout_rate", 0.1), ("caption_tag_dropout_rate", 0.1),
                       ("caption_dropout_every_n_epochs", 2), ("token_warmup_step", 5), ("enable_wildcard", True)):  # fmt: skip
        assert CaptionOptions(**{key: value}).varies, key


def test_caption_files_are_utf8_with_or_without_bom(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes("\ufeffcafé, dog\n".encode())
    assert read_caption_file(tmp_path / "a.txt") == "café, dog"
    (tmp_path / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"b\.txt is not UTF-8"):
        read_caption_file(tmp_path / "b.txt")
