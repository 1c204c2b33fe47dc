"""The --interactive prompt loop: inline options, what carries over between prompts, errors that ask again."""

from __future__ import annotations

import io

import pytest

from library.inference.interactive import (
    PROMPT,
    ImageRequest,
    InlineOptionError,
    next_request,
    parse_prompt_line,
    run_prompt_loop,
)

DEFAULTS = ImageRequest("cat", "blurry", 5, 1360, 768, None, 3.5, 1.0)


def test_every_inline_option():
    prompt, values = parse_prompt_line("a red circle --w 64 --h 48 --s 2 --d 7 --g 2.5 --c 4 --m 0.5, 1 --n dark, ugly")
    assert prompt == "a red circle"
    assert values == {
        "width": 64, "height": 48, "steps": 2, "seed": 7, "guidance": 2.5, "cfg_scale": 4.0,
        "lora_multipliers": (0.5, 1.0), "negative_prompt": "dark, ugly",
    }  # fmt: skip
    assert parse_prompt_line("x --n -") == ("x", {"negative_prompt": ""})
    assert parse_prompt_line("a well-known sign -- with dashes") == ("a well-known sign -- with dashes", {})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("x --w abc", "--w 'abc': expected an integer"),
        ("x --h 8", "--h '8': must be at least 16 pixels"),
        ("x --s 0", "--s '0': must be at least 1"),
        ("x --d -1", "--d '-1': must be between 0 and 2**64 - 1"),
        ("x --g strong", "--g 'strong': expected a number"),
        ("x --m 1,a", "--m '1,a': expected comma-separated numbers"),
        ("x --w", "--w needs a value (an integer)"),
        ("x --width 64", "unknown option --width (options: --w --h --s --d --g --c --m --n)"),
    ],
)
def test_bad_options(line, message):
    with pytest.raises(InlineOptionError) as e:
        parse_prompt_line(line)
    assert str(e.value) == message


def test_settings_carry_over_but_seed_and_negative_prompt_do_not():
    first = next_request("dog --w 64 --h 48 --s 2 --g 1.5 --c 3 --d 9 --n dark --m 0.5", DEFAULTS, DEFAULTS)
    assert first == ImageRequest("dog", "dark", 9, 64, 48, 2, 1.5, 3.0, (0.5,))
    second = next_request("bird --h 32", first, DEFAULTS)
    assert second == ImageRequest("bird", "blurry", 5, 64, 32, 2, 1.5, 3.0, (0.5,))


def test_loop_asks_again_after_errors_and_stops_on_empty_line_or_eof():
    generated: list[ImageRequest] = []

    def generate(request: ImageRequest) -> None:
        if request.lora_multipliers:
            raise InlineOptionError("--m: no LoRA")
        generated.append(request)

    lines = iter(["x --w abc\n", "y --m 1 --w 32\n", "z --h 64\n", "\n", "never read\n"])
    out, err = io.StringIO(), io.StringIO()
    assert run_prompt_loop(DEFAULTS, generate, lambda: next(lines), out, err) == 1
    assert err.getvalue().splitlines() == ["error: --w 'abc': expected an integer", "error: --m: no LoRA"]
    assert generated == [ImageRequest("z", "blurry", 5, 1360, 64, None, 3.5, 1.0)]  # rejected lines leave no trace
    assert out.getvalue() == (PROMPT + "\n") * 4
    assert next(lines) == "never read\n"

    assert run_prompt_loop(DEFAULTS, generate, lambda: "", out, err) == 0  # end of input
