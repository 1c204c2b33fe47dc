"""The bundled tokenizers give the real token ids (transformers 5 can silently build garbage tokenizers)."""

from __future__ import annotations

import json

import pytest
import sentencepiece

from library.errors import UserError
from library.models.text_encoders.tokenizers import ASSETS, load_clip_tokenizer, load_t5_tokenizer, tokenize


def test_clip_l_known_ids():
    ids, mask = tokenize(load_clip_tokenizer(), ["a photo of a cat"], 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7:].eq(49407).all() and mask[0].sum() == 7 and ids.shape == (1, 77)


def test_clip_ids_agree_with_the_vocabulary():
    vocab = json.loads((ASSETS / "clip_l" / "vocab.json").read_text(encoding="utf-8"))
    ids, _ = tokenize(load_clip_tokenizer(), ["A Photo, of a CAT!! 123"], 77)
    words = ["a</w>", "photo</w>", ",</w>", "of</w>", "a</w>", "cat</w>", "!!</w>", "1</w>", "2</w>", "3</w>"]
    assert ids[0, 1:11].tolist() == [vocab[w] for w in words]  # lower-cased; CLIP splits digits one by one


def test_clip_g_pads_with_exclamation_mark():
    ids, mask = tokenize(load_clip_tokenizer(variant="clip_g"), ["a photo of a cat"], 10)
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    assert mask[0].tolist() == [1] * 7 + [0] * 3


def test_t5_known_ids_and_sentencepiece_agreement():
    tokenizer = load_t5_tokenizer()
    ids, mask = tokenize(tokenizer, ["Hello world"], 8)
    assert ids[0].tolist() == [8774, 296, 1, 0, 0, 0, 0, 0] and mask[0].sum() == 3
    text = "A Photo, of a CAT!! 123 holding a sign that says 'hello'."
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ASSETS / "t5xxl" / "spiece.model"))
    ids, _ = tokenize(tokenizer, [text], 64)
    expected = sp.encode(text) + [1]
    assert ids[0, : len(expected)].tolist() == expected


def test_truncation_to_max_length():
    ids, _ = tokenize(load_t5_tokenizer(), ["word " * 600], 512)
    assert ids.shape == (1, 512) and ids[0, -1] == 1


def test_other_tokenizer_folder(tmp_path):
    with pytest.raises(UserError, match=r"--t5xxl_tokenizer .*: not a tokenizer folder \(missing tokenizer.json\)"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(UserError, match="folder not found"):
        load_clip_tokenizer(tmp_path / "nope")
