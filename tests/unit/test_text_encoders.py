"""CLIP and T5 text encoders loaded from single files, against transformers models built directly from the
same state dicts (the independent reference), in every dtype and layout users have."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.errors import UserError
from library.models.autoencoder.loading import make_tiny_autoencoder_state_dict
from library.models.text_encoders.clip import (
    encode_clip_hidden,
    encode_clip_l,
    load_clip_text_model,
    make_tiny_clip_state_dict,
)
from library.models.text_encoders.t5 import encode_t5, load_t5_encoder, make_tiny_t5_state_dict

IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 5])


def _save(state, path, dtype=None):
    save_file({k: v.to(dtype) if dtype else v for k, v in state.items()}, str(path))
    return path


def _clip_reference(state):
    config = CLIPTextConfig(vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406)  # fmt: skip
    model = CLIPTextModel(config).eval()
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=False)
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_clip_matches_transformers(tmp_path, dtype, tol):
    state = make_tiny_clip_state_dict(seed=1)
    model = load_clip_text_model(_save(state, tmp_path / "clip.safetensors", dtype), dtype=torch.float32)
    with torch.no_grad():
        expected = _clip_reference(state)(input_ids=IDS).pooler_output
        out = encode_clip_l(model, IDS)
    assert out.shape == (1, 128)
    assert ((out - expected).abs().max() / expected.abs().max()) < tol


def test_clip_without_prefix_and_with_position_ids(tmp_path):
    state = make_tiny_clip_state_dict(seed=2)
    bare = {k.removeprefix("text_model."): v for k, v in state.items()}
    with_ids = dict(state, **{"text_model.embeddings.position_ids": torch.arange(77)[None]})
    a = load_clip_text_model(_save(bare, tmp_path / "bare.safetensors"))
    b = load_clip_text_model(_save(with_ids, tmp_path / "ids.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(encode_clip_l(a, IDS), encode_clip_l(b, IDS))


def test_clip_with_projection(tmp_path):
    model = load_clip_text_model(_save(make_tiny_clip_state_dict(with_projection=True), tmp_path / "g.safetensors"))
    assert type(model).__name__ == "CLIPTextModelWithProjection"


def test_t5_matches_transformers_in_each_dtype(tmp_path):
    state = make_tiny_t5_state_dict(seed=3)
    config = T5Config(vocab_size=32128, d_model=128, d_kv=64, num_heads=2, num_layers=2, d_ff=256,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, dropout_rate=0.0)  # fmt: skip
    reference = T5EncoderModel(config).eval()
    reference.load_state_dict(dict(state, **{"encoder.embed_tokens.weight": state["shared.weight"]}))
    ids = torch.tensor([[8774, 296, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float8_e4m3fn, 0.3)]:
            model = load_t5_encoder(_save(state, tmp_path / f"t5-{dtype}.safetensors", dtype), dtype=torch.float32)
            out = encode_t5(model, ids, mask, apply_attn_mask=False)
            assert ((out - expected).abs().max() / expected.abs().max()) < tol, dtype
        masked = encode_t5(model, ids, mask, apply_attn_mask=True)
        assert not torch.allclose(masked, out)
        fp16 = load_t5_encoder(tmp_path / "t5-torch.float32.safetensors", dtype=torch.float16)
        assert fp16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # overflow guard
        assert fp16.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16


def test_missing_key_is_named(tmp_path):
    state = make_tiny_t5_state_dict()
    del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(UserError, match=r"missing 1 keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight"):
        load_t5_encoder(_save(state, tmp_path / "t5.safetensors"))


def test_wrong_files(tmp_path):
    clip = _save(make_tiny_clip_state_dict(), tmp_path / "clip.safetensors")
    t5 = _save(make_tiny_t5_state_dict(), tmp_path / "t5.safetensors")
    ae = _save(make_tiny_autoencoder_state_dict(), tmp_path / "ae.safetensors")
    clip_g = _save({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1280, 1280),
                    "text_model.embeddings.token_embedding.weight": torch.zeros(4, 1280),
                    "text_model.embeddings.position_embedding.weight": torch.zeros(77, 1280),
                    "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 1280)}, tmp_path / "g.safetensors")  # fmt: skip
    cases = [
        (load_clip_text_model, "--clip_l", t5, "T5 text encoder"),
        (load_clip_text_model, "--clip_l", ae, "16-channel autoencoder"),
        (load_clip_text_model, "--clip_l", clip_g, "found CLIP-G text encoder"),
        (load_t5_encoder, "--t5xxl", clip, "CLIP text encoder"),
        (load_t5_encoder, "--t5xxl", ae, "autoencoder"),
    ]
    for load, option, path, found in cases:
        with pytest.raises(UserError) as error:
            load(path, option=option)
        message = str(error.value)
        assert message.startswith(f"{option} {path}: expected") and found in message and "\n" not in message


def _sd3_packaging(tmp_path):
    """A tiny SD3 "incl_clips_t5" checkpoint: encoders nested under text_encoders.*.transformer., next to other
    parts whose keys must be ignored; and the same encoders as separate files."""
    clip_l = make_tiny_clip_state_dict(hidden=128, seed=4)  # no projection, as SD3's CLIP-L files
    clip_g = make_tiny_clip_state_dict(hidden=192, intermediate=384, with_projection=True, seed=5)
    t5 = make_tiny_t5_state_dict(d_model=384, num_heads=6, seed=6)
    packed = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(128, 16, 2, 2),
              "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}  # fmt: skip
    for name, state in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
        packed.update({f"text_encoders.{name}.transformer.{k}": v for k, v in state.items()})
    files = {name: _save(state, tmp_path / f"{name}.safetensors")
             for name, state in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5))}  # fmt: skip
    return _save(packed, tmp_path / "sd3_incl_clips_t5.safetensors"), files


def test_encoders_embedded_in_sd3_checkpoint(tmp_path):
    ckpt, files = _sd3_packaging(tmp_path)
    ids = IDS.clone()
    with torch.no_grad():
        for option, width, name in (("--clip_l", 768, "clip_l"), ("--clip_g", 1280, "clip_g")):
            prefix = f"text_encoders.{name}.transformer."
            nested = load_clip_text_model(ckpt, option=option, expect_width=width, prefix=prefix, with_projection=True)
            single = load_clip_text_model(files[name], option=option, expect_width=width, with_projection=True)
            assert type(nested).__name__ == "CLIPTextModelWithProjection"
            for a, b in zip(encode_clip_hidden(nested, ids), encode_clip_hidden(single, ids)):
                torch.testing.assert_close(a, b)
        t5_nested = load_t5_encoder(ckpt, prefix="text_encoders.t5xxl.transformer.")
        t5_single = load_t5_encoder(files["t5xxl"])
        t5_ids, t5_mask = torch.tensor([[8774, 296, 1, 0]]), torch.tensor([[1, 1, 1, 0]])
        torch.testing.assert_close(
            encode_t5(t5_nested, t5_ids, t5_mask, True), encode_t5(t5_single, t5_ids, t5_mask, True)
        )


def test_clip_identity_projection_and_flux_behaviour(tmp_path):
    path = _save(make_tiny_clip_state_dict(seed=7), tmp_path / "clip_l.safetensors")
    plain = load_clip_text_model(path)  # FLUX: as the file says
    projected = load_clip_text_model(path, with_projection=True)
    assert type(plain).__name__ == "CLIPTextModel" and type(projected).__name__ == "CLIPTextModelWithProjection"
    torch.testing.assert_close(projected.text_projection.weight, torch.eye(128))
    with torch.no_grad():
        _, pooled = encode_clip_hidden(projected, IDS)
        torch.testing.assert_close(pooled, plain(input_ids=IDS).pooler_output)  # identity: the final-normed EOS
    with_proj = _save(make_tiny_clip_state_dict(with_projection=True, seed=8), tmp_path / "p.safetensors")
    assert type(load_clip_text_model(with_proj, with_projection=False)).__name__ == "CLIPTextModel"


def test_clip_hidden_is_penultimate_layer_and_mask_acts_inside(tmp_path):
    state = make_tiny_clip_state_dict(seed=9)
    model = load_clip_text_model(_save(state, tmp_path / "l.safetensors"), with_projection=True)
    reference = _clip_reference(state)
    mask = (torch.arange(IDS.shape[1]) < 7).long()[None]
    with torch.no_grad():
        hidden, _ = encode_clip_hidden(model, IDS)
        expected = reference(input_ids=IDS, output_hidden_states=True).hidden_states[1]  # embeddings, layer 0, 1
        torch.testing.assert_close(hidden, expected)
        masked, pooled_masked = encode_clip_hidden(model, IDS, mask)
        _, pooled = encode_clip_hidden(model, IDS)
    torch.testing.assert_close(masked[:, :7], hidden[:, :7])  # causal: real tokens never see the padding
    assert not torch.allclose(masked[:, 7:], hidden[:, 7:])
    torch.testing.assert_close(pooled_masked, pooled)


def test_clip_g_needs_its_projection(tmp_path):
    path = _save(make_tiny_clip_state_dict(hidden=192, intermediate=384, seed=10), tmp_path / "g.safetensors")
    with pytest.raises(UserError, match=r"^--clip_g .*g\.safetensors: expected a CLIP-G text encoder with "
                                        r"text_projection\.weight, the file has none"):  # fmt: skip
        load_clip_text_model(path, option="--clip_g", expect_width=1280)


def test_real_width_clip_l_given_as_clip_g(tmp_path):
    """A real-width (768) CLIP-L, tiny otherwise, in fp16: rejected from the header, in one line."""
    state = make_tiny_clip_state_dict(hidden=768, layers=1, intermediate=64, seed=11)
    state["text_model.embeddings.token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"][:64]
    path = _save(state, tmp_path / "clip_l.safetensors", torch.float16)
    with pytest.raises(UserError) as error:
        load_clip_text_model(path, option="--clip_g", expect_width=1280)
    assert str(error.value) == f"--clip_g {path}: expected a CLIP-G text encoder, found CLIP-L text encoder"
    assert type(load_clip_text_model(path, option="--clip_l")).__name__ == "CLIPTextModel"


def test_prefix_errors_name_option_file_and_prefix(tmp_path):
    ckpt, _ = _sd3_packaging(tmp_path)
    with pytest.raises(UserError) as error:
        load_clip_text_model(ckpt, option="--clip_l", prefix="text_encoders.clip_x.transformer.")
    assert str(error.value).startswith(f"--clip_l {ckpt} under 'text_encoders.clip_x.transformer.': expected a CLIP-L")
    with pytest.raises(UserError, match=r"^--t5xxl .* under 'text_encoders\.t5xxl\.': expected a T5-XXL"):
        load_t5_encoder(ckpt, prefix="text_encoders.t5xxl.")
    state = make_tiny_t5_state_dict(d_model=128)
    del state["encoder.block.1.layer.0.SelfAttention.o.weight"]
    nested = _save({f"te.{k}": v for k, v in state.items()} | {"other.weight": torch.zeros(2)}, tmp_path / "n.sft")
    with pytest.raises(UserError, match=r"^--t5xxl .*n\.sft under 'te\.': not a complete T5 encoder checkpoint: "
                                        r"missing 1 keys: encoder\.block\.1\.layer\.0\.SelfAttention\.o\.weight$"):  # fmt: skip
        load_t5_encoder(nested, prefix="te.")
