"""SD3 prompt conditioning from tiny CLIP-L (128), CLIP-G (192) and T5 (384) single files, against a hand assembly
with transformers models built directly from the state dicts and against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.errors import UserError
from library.models.sd3.text_conditioning import (
    TEXT_CACHE_KEYS,
    SD3TextConditioning,
    SD3TextDrop,
    SD3TextDropoutRates,
    SD3TextEncoder,
    apply_text_dropout,
    draw_text_dropout,
    load_sd3_tokenizers,
)
from library.models.text_encoders.clip import load_clip_text_model, make_tiny_clip_state_dict
from library.models.text_encoders.t5 import load_t5_encoder, make_tiny_t5_state_dict

L, G, T5W, T5_LEN = 128, 192, 384, 32
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, stormy sea"]


@pytest.fixture(scope="module")
def states():
    return {
        "clip_l": make_tiny_clip_state_dict(hidden=L, seed=21),
        "clip_g": make_tiny_clip_state_dict(hidden=G, intermediate=384, with_projection=True, seed=22),
        "t5": make_tiny_t5_state_dict(d_model=T5W, num_heads=6, seed=23),
    }


@pytest.fixture(scope="module")
def models(states, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3_te")
    for name, state in states.items():
        save_file(state, str(folder / f"{name}.safetensors"))
    clip_l = load_clip_text_model(folder / "clip_l.safetensors", with_projection=True)
    clip_g = load_clip_text_model(folder / "clip_g.safetensors", option="--clip_g", expect_width=1280)
    return clip_l, clip_g, load_t5_encoder(folder / "t5.safetensors")


@pytest.fixture(scope="module")
def tokenizers():
    return load_sd3_tokenizers()


def _encoder(models, tokenizers, **kwargs) -> SD3TextEncoder:
    kwargs.setdefault("t5_max_length", T5_LEN)
    return SD3TextEncoder(*models, *tokenizers, **kwargs)


@pytest.fixture(scope="module")
def references(states):
    """transformers models built from the same state dicts, not through our loaders."""

    def clip(state, width, intermediate):
        config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=intermediate,
                                num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=77,
                                projection_dim=width, bos_token_id=49406, eos_token_id=49407)  # fmt: skip
        model = CLIPTextModelWithProjection(config).eval()
        state = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                 for k, v in state.items()}  # fmt: skip
        state.setdefault("text_projection.weight", torch.eye(width))
        model.load_state_dict(state, strict=False)
        return model

    config = T5Config(vocab_size=32128, d_model=T5W, d_kv=64, num_heads=6, num_layers=2, d_ff=256,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)  # fmt: skip
    t5 = T5EncoderModel(config).eval()
    t5.load_state_dict(dict(states["t5"], **{"encoder.embed_tokens.weight": states["t5"]["shared.weight"]}))
    return clip(states["clip_l"], L, 256), clip(states["clip_g"], G, 384), t5


def _by_hand(references, tokenizers, prompts, lg_mask=False, t5_mask=False):
    clip_l, clip_g, t5 = references
    tok_l, tok_g, tok_t5 = tokenizers
    outs, pooled = [], []
    for model, tok in ((clip_l, tok_l), (clip_g, tok_g)):
        batch = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = model(batch.input_ids, batch.attention_mask if lg_mask else None, output_hidden_states=True)
        outs.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    batch = tok_t5(prompts, padding="max_length", max_length=T5_LEN, truncation=True, return_tensors="pt")
    t5_out = t5(batch.input_ids, attention_mask=batch.attention_mask if t5_mask else None).last_hidden_state
    lg = torch.cat(outs, dim=-1)
    lg = torch.cat([lg, torch.zeros(*lg.shape[:2], T5W - L - G)], dim=-1)
    return torch.cat([lg, t5_out], dim=1), torch.cat(pooled, dim=-1)


def test_shapes_and_cache_keys(models, tokenizers):
    with torch.no_grad():
        cond = _encoder(models, tokenizers, t5_max_length=256).encode(PROMPTS)
    shapes = {k: tuple(getattr(cond, k).shape) for k in TEXT_CACHE_KEYS}
    assert shapes == {"lg_out": (2, 77, L + G), "t5_out": (2, 256, T5W), "lg_pooled": (2, L + G),
                      "clip_l_attn_mask": (2, 77), "clip_g_attn_mask": (2, 77), "t5_attn_mask": (2, 256)}  # fmt: skip
    context, y = cond.model_inputs()
    assert context.shape == (2, 333, T5W) and y.shape == (2, L + G)
    assert cond.clip_l_attn_mask[0].sum() == 7  # <start> 5 words <end>
    assert cond.t5_attn_mask[0].sum() == len(tokenizers[2](PROMPTS[0]).input_ids) < 256


def test_matches_hand_assembly(models, tokenizers, references):
    with torch.no_grad():
        context, y = _encoder(models, tokenizers).encode(PROMPTS).model_inputs()
        expected_context, expected_y = _by_hand(references, tokenizers, PROMPTS)
    torch.testing.assert_close(context, expected_context)
    torch.testing.assert_close(y, expected_y)
    assert context[:, :77, L + G :].eq(0).all()


def test_matches_diffusers_encode_prompt(models, tokenizers, references):
    from diffusers import StableDiffusion3Pipeline

    tok_l, tok_g, tok_t5 = load_sd3_tokenizers()
    pipe = StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None, text_encoder=references[0], tokenizer=tok_l,
        text_encoder_2=references[1], tokenizer_2=tok_g, text_encoder_3=references[2], tokenizer_3=tok_t5,
    )  # fmt: skip
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False,
            max_sequence_length=T5_LEN,
        )  # fmt: skip
        context, y = _encoder(models, tokenizers).encode(PROMPTS).model_inputs()
    torch.testing.assert_close(context, embeds)
    torch.testing.assert_close(y, pooled)


def test_masks_act_inside_the_encoders_only_when_asked(models, tokenizers, references):
    with torch.no_grad():
        plain = _encoder(models, tokenizers).encode(PROMPTS)
        lg = _encoder(models, tokenizers, apply_lg_attn_mask=True).encode(PROMPTS)
        t5 = _encoder(models, tokenizers, apply_t5_attn_mask=True).encode(PROMPTS)
        expected_lg = _by_hand(references, tokenizers, PROMPTS, lg_mask=True)
        expected_t5 = _by_hand(references, tokenizers, PROMPTS, t5_mask=True)
    for key in ("clip_l_attn_mask", "clip_g_attn_mask", "t5_attn_mask"):
        assert torch.equal(getattr(plain, key), getattr(lg, key)) and torch.equal(getattr(plain, key), getattr(t5, key))
    torch.testing.assert_close(lg.t5_out, plain.t5_out)
    torch.testing.assert_close(lg.lg_pooled, plain.lg_pooled)  # the end token never sees the padding
    assert not torch.allclose(lg.lg_out[0, 7:], plain.lg_out[0, 7:])  # padding outputs change, not zeroed
    assert lg.lg_out[0, 7:].abs().sum() > 0
    torch.testing.assert_close(t5.lg_out, plain.lg_out)
    assert not torch.allclose(t5.t5_out, plain.t5_out)
    for cond, (expected_context, expected_y) in ((lg, expected_lg), (t5, expected_t5)):
        context, y = cond.model_inputs()
        torch.testing.assert_close(context, expected_context)
        torch.testing.assert_close(y, expected_y)


def test_long_prompts_are_truncated_to_77_clip_tokens(models, tokenizers):
    long = "a very detailed photograph of " + "red and blue " * 40
    encoder = _encoder(models, tokenizers, t5_max_length=8)
    with torch.no_grad():
        a, b = encoder.encode([long, long + " with a green hat"]).lg_out
    torch.testing.assert_close(a, b)
    assert a.shape == (77, L + G)


def test_without_t5_77_zero_tokens_stand_in(models, tokenizers, references):
    clip_l, clip_g, _ = models
    encoder = SD3TextEncoder(clip_l, clip_g, None, tokenizers[0], tokenizers[1], None, context_width=T5W)
    with torch.no_grad():
        cond = encoder.encode(PROMPTS)
        expected_context, expected_y = _by_hand(references, tokenizers, PROMPTS)
    context, y = cond.model_inputs()
    assert context.shape == (2, 154, T5W) and cond.t5_out.eq(0).all() and cond.t5_attn_mask.eq(0).all()
    torch.testing.assert_close(context[:, :77], expected_context[:, :77])
    torch.testing.assert_close(y, expected_y)
    assert SD3TextEncoder(clip_l, clip_g, None, tokenizers[0], tokenizers[1], None).context_width == 4096


def test_clip_g_pads_with_zero_and_clip_l_with_end_token(tokenizers):
    tok_l, tok_g, _ = tokenizers
    assert tok_l("a cat", padding="max_length", max_length=6).input_ids[-1] == 49407
    assert tok_g("a cat", padding="max_length", max_length=6).input_ids[-1] == 0


def test_dropout_zeroes_exactly_each_encoders_part(models, tokenizers):
    with torch.no_grad():
        cond = _encoder(models, tokenizers).encode(PROMPTS * 2)
    drop = SD3TextDrop(clip_l=torch.tensor([True, False, False, True]), clip_g=torch.tensor([False, True, False, True]),
                       t5=torch.tensor([False, False, True, True]))  # fmt: skip
    out = apply_text_dropout(cond, drop, clip_l_width=L)
    for i in range(4):
        l_dropped, g_dropped, t5_dropped = drop.clip_l[i], drop.clip_g[i], drop.t5[i]
        for dropped, part, pooled, mask in (
            (l_dropped, slice(0, L), slice(0, L), "clip_l_attn_mask"),
            (g_dropped, slice(L, L + G), slice(L, L + G), "clip_g_attn_mask"),
        ):
            expected = torch.zeros_like if dropped else (lambda x: x)
            assert torch.equal(out.lg_out[i, :, part], expected(cond.lg_out[i, :, part]))
            assert torch.equal(out.lg_pooled[i, pooled], expected(cond.lg_pooled[i, pooled]))
            assert torch.equal(getattr(out, mask)[i], expected(getattr(cond, mask)[i]))
        expected = torch.zeros_like if t5_dropped else (lambda x: x)
        assert torch.equal(out.t5_out[i], expected(cond.t5_out[i]))
        assert torch.equal(out.t5_attn_mask[i], expected(cond.t5_attn_mask[i]))
    assert cond.lg_out.abs().sum() > 0 and cond.clip_l_attn_mask.sum() > 0  # the input is untouched
    context, y = out.model_inputs()
    assert context[3].eq(0).all() and y[3].eq(0).all()


def test_dropout_draws(monkeypatch):
    assert not draw_text_dropout(64, SD3TextDropoutRates()).clip_l.any()
    everything = draw_text_dropout(64, SD3TextDropoutRates(1.0, 1.0, 1.0))
    assert everything.clip_l.all() and everything.clip_g.all() and everything.t5.all()
    rates = SD3TextDropoutRates(clip_l=0.25, clip_g=0.5, t5=0.75)
    a = draw_text_dropout(4000, rates, torch.Generator().manual_seed(3))
    b = draw_text_dropout(4000, rates, torch.Generator().manual_seed(3))
    assert torch.equal(a.clip_l, b.clip_l) and torch.equal(a.t5, b.t5)
    for drawn, rate in ((a.clip_l, 0.25), (a.clip_g, 0.5), (a.t5, 0.75)):
        assert abs(drawn.float().mean().item() - rate) < 0.03
    assert (a.clip_l != a.clip_g).any()  # independent per encoder
    with pytest.raises(UserError, match=r"--t5_dropout_rate must be between 0 and 1, got 1.5"):
        SD3TextDropoutRates(t5=1.5)


def test_encode_is_differentiable_and_to_keeps_masks(models, tokenizers):
    clip_l = models[0]
    weight = clip_l.text_model.encoder.layers[0].mlp.fc1.weight
    weight.requires_grad_(True)
    try:
        cond = _encoder(models, tokenizers).encode(PROMPTS[:1])
        context, y = cond.model_inputs()
        (context.sum() + y.sum()).backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    half = cond.to("cpu", torch.bfloat16)
    assert isinstance(half, SD3TextConditioning) and half.lg_out.dtype == torch.bfloat16
    assert half.t5_attn_mask.dtype == cond.t5_attn_mask.dtype
