"""The FLUX.1 ControlNet (XLabs layout): its saved keys, zero init, init from the base model, loading and saving,
wrong files, and parity with diffusers' FluxControlNetModel + FluxTransformer2DModel(controlnet_blocks_repeat=True)
through diffusers' own FLUX key converter."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import library.models.flux.controlnet as controlnet_module
from library.errors import UserError
from library.models.autoencoder.loading import make_tiny_autoencoder_state_dict
from library.models.flux.controlnet import HEAD_MODULES, ControlNetParams, FluxControlNet, new_flux_controlnet
from library.models.flux.controlnet_loading import (
    check_controlnet_fits,
    load_flux_controlnet,
    open_flux_controlnet,
    save_flux_controlnet,
)
from library.models.flux.model import Flux, FluxParams
from library.models.flux.sampling import pack_latents, prepare_img_ids
from library.models.flux.tiny import make_flux_controlnet_state_dict, make_flux_state_dict, tiny_flux_params
from tests.helpers import flux_state_to_diffusers

VEC, CONTEXT = 96, 80
# XLabs' top-level modules; the block keys are derived from the base model's own
XLABS_TOP = ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
             "txt_in", "pos_embed_input", *(f"input_hint_block.{i}" for i in range(0, 16, 2))]  # fmt: skip
XLABS_GUIDANCE = ["guidance_in.in_layer", "guidance_in.out_layer"]


def _params(depth: int = 3, guidance: bool = True, hidden: int = 256) -> FluxParams:
    return tiny_flux_params(hidden_size=hidden, depth=depth, depth_single_blocks=1, vec_in_dim=VEC,
                            context_in_dim=CONTEXT, guidance_embed=guidance)  # fmt: skip


def _base(params: FluxParams, seed: int = 1) -> Flux:
    model = Flux(params)
    model.load_state_dict(make_flux_state_dict(params, seed=seed))
    return model.eval()


def _random_controlnet(params: FluxParams, depth: int = 2, seed: int = 2) -> FluxControlNet:
    cn_params = ControlNetParams(params, depth)
    model = FluxControlNet(cn_params)
    model.load_state_dict(make_flux_controlnet_state_dict(cn_params, seed=seed))
    return model.eval()


def _inputs(batch: int = 2, height: int = 6, width: int = 4, txt_len: int = 7, seed: int = 0) -> dict:
    """Latent 6x4 -> 3x2 tokens (non-square catches h/w swaps); the hint at the pixel size 48x32."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=pack_latents(torch.randn(batch, 16, height, width, generator=gen)),
        img_ids=prepare_img_ids(batch, height, width),
        txt=torch.randn(batch, txt_len, CONTEXT, generator=gen),
        txt_ids=torch.zeros(batch, txt_len, 3),
        y=torch.randn(batch, VEC, generator=gen),
        timesteps=torch.tensor([0.3, 0.85][:batch]),
        guidance=torch.tensor([3.5, 1.0][:batch]),
    ), torch.rand(batch, 3, 8 * height, 8 * width, generator=gen) * 2 - 1


def _expected_keys(base: Flux, depth: int) -> set[str]:
    block_suffixes = [k.split(".", 2)[2] for k in base.state_dict() if k.startswith("double_blocks.0.")]
    top = XLABS_TOP + (XLABS_GUIDANCE if base.params.guidance_embed else [])
    return (
        {f"{name}.{s}" for name in top for s in ("weight", "bias")}
        | {f"double_blocks.{i}.{s}" for i in range(depth) for s in block_suffixes}
        | {f"controlnet_blocks.{i}.{s}" for i in range(depth) for s in ("weight", "bias")}
    )


@pytest.mark.parametrize("depth,guidance", [(2, True), (3, False)])
def test_saved_keys_are_xlabs_layout(tmp_path, depth, guidance):
    base = _base(_params(depth=3, guidance=guidance))
    path = tmp_path / "controlnet.safetensors"
    save_flux_controlnet(new_flux_controlnet(base, depth), path, dtype=torch.bfloat16, metadata={"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == _expected_keys(base, depth)
        assert f.metadata() == {"k": "v"}
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert f.get_tensor("input_hint_block.0.weight").shape == (16, 3, 3, 3)
        assert f.get_tensor("pos_embed_input.weight").shape == (256, 64)


def test_full_size_matches_upstream_count():
    """FLUX.1 dev's ControlNet at the default depth: 86 tensors, 743.8 M parameters (upstream's, counted)."""
    with torch.device("meta"):
        state = FluxControlNet(ControlNetParams(FluxParams())).state_dict()
    assert len(state) == 86
    assert round(sum(t.numel() for t in state.values()) / 1e5) == 7438


def test_hint_block_is_eight_convs_three_strided():
    model = new_flux_controlnet(_base(_params()))
    convs = [(i, m) for i, m in enumerate(model.input_hint_block) if isinstance(m, torch.nn.Conv2d)]
    assert [i for i, _ in convs] == list(range(0, 16, 2))
    assert [m.stride[0] for _, m in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert all(isinstance(m, torch.nn.SiLU) for m in model.input_hint_block[1::2])


def test_fresh_controlnet_leaves_base_unchanged():
    base = _base(_params())
    inputs, hint = _inputs()
    controlnet = new_flux_controlnet(base)
    with torch.no_grad():
        samples = controlnet(controlnet_cond=hint, **inputs)
        assert len(samples) == 2 and all(s.shape == (2, 6, 256) for s in samples)
        assert torch.equal(base(**inputs, controlnet_block_samples=samples), base(**inputs))
        trained = _random_controlnet(base.params)(controlnet_cond=hint, **inputs)
        assert (base(**inputs, controlnet_block_samples=trained) - base(**inputs)).abs().max() > 1e-2
        assert torch.equal(base(**inputs, controlnet_block_samples=trained, controlnet_scale=0.0), base(**inputs))


def test_init_from_base_copies_exactly():
    base = _base(_params()).to(torch.bfloat16)
    copied = new_flux_controlnet(base, depth=2, init_from_base=True)
    fresh = new_flux_controlnet(base, depth=2)
    base_state, state = base.state_dict(), copied.state_dict()
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    shared = [k for k in state if not k.startswith(HEAD_MODULES)]
    assert "double_blocks.1.img_attn.qkv.weight" in shared and "guidance_in.out_layer.bias" in shared
    for key in shared:
        assert torch.equal(state[key], base_state[key]), key
        assert not torch.equal(fresh.state_dict()[key], base_state[key]), key
    assert all(not t.any() for k, t in state.items() if k.startswith(("controlnet_blocks.", "input_hint_block.14.")))
    with pytest.raises(ValueError, match="cannot copy 4 double blocks"):
        new_flux_controlnet(base, depth=4, init_from_base=True)


def test_text_mask_hides_padding():
    """With T5's attention mask, padded text tokens do not reach the samples: as if the text were shorter."""
    controlnet = _random_controlnet(_params())
    inputs, hint = _inputs()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 5:] = False
    short = dict(inputs, txt=inputs["txt"][:, :5], txt_ids=inputs["txt_ids"][:, :5])
    with torch.no_grad():
        masked = controlnet(controlnet_cond=hint, txt_attention_mask=mask, **inputs)
        for a, b in zip(masked, controlnet(controlnet_cond=hint, **short), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert (controlnet(controlnet_cond=hint, **inputs)[1] - masked[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mem_eff", [False, True])
def test_load_save_round_trip(tmp_path, mem_eff):
    params = _params()
    original = _random_controlnet(params)
    path = tmp_path / "xlabs.safetensors"
    save_file(make_flux_controlnet_state_dict(ControlNetParams(params), seed=2), str(path))  # a bare XLabs file
    loaded = load_flux_controlnet(path, dtype=torch.float32, device="cpu")
    assert loaded.params == ControlNetParams(replace(params, depth=2, depth_single_blocks=0), depth=2)
    inputs, hint = _inputs()
    with torch.no_grad():
        expected = original(controlnet_cond=hint, **inputs)
        for a, b in zip(loaded(controlnet_cond=hint, **inputs), expected, strict=True):
            assert torch.equal(a, b)
    again = tmp_path / "again.safetensors"
    save_flux_controlnet(loaded, again, dtype=None, metadata=None, mem_eff=mem_eff)
    assert load_file(str(again)).keys() == load_file(str(path)).keys()
    for key, tensor in load_file(str(path)).items():
        assert torch.equal(load_file(str(again))[key], tensor), key
    half = load_flux_controlnet(again, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and not any(
        p.requires_grad for p in half.parameters()
    )


@pytest.mark.parametrize("depth,guidance", [(1, True), (3, False)])
def test_architecture_read_from_tensors(tmp_path, depth, guidance):
    params = _params(guidance=guidance, hidden=384)
    path = tmp_path / "cn.safetensors"
    save_file(make_flux_controlnet_state_dict(ControlNetParams(params, depth), dtype=torch.float16), str(path))
    _, found = open_flux_controlnet(path, "--controlnet")
    assert (found.depth, found.base.hidden_size, found.base.num_heads, found.base.guidance_embed) == (
        depth, 384, 3, guidance,
    )  # fmt: skip
    assert (found.base.vec_in_dim, found.base.context_in_dim, found.base.axes_dim) == (VEC, CONTEXT, (16, 56, 56))


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_wrong_files_give_one_line(tmp_path):
    params = _params()
    cn_state = make_flux_controlnet_state_dict(ControlNetParams(params))
    flux_state = make_flux_state_dict(params)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a model\n" * 20)
    single = {**cn_state, **{k: v for k, v in flux_state.items() if k.startswith("single_blocks.0.")},
              "controlnet_blocks_for_single.0.weight": cn_state["controlnet_blocks.0.weight"].clone()}  # fmt: skip
    cases = {
        "file not found": tmp_path / "missing.safetensors",
        "not a safetensors file": text,
        "found FLUX.1 dev transformer": _write(tmp_path / "flux.safetensors", flux_state),
        "found 16-channel autoencoder": _write(tmp_path / "ae.safetensors", make_tiny_autoencoder_state_dict()),
        "FLUX ControlNet in diffusers' layout": _write(
            tmp_path / "diffusers.safetensors", _controlnet_state_to_diffusers(cn_state, flux_state, 256)
        ),
        "missing 1 keys: input_hint_block.14.bias": _write(
            tmp_path / "partial.safetensors", {k: v for k, v in cn_state.items() if k != "input_hint_block.14.bias"}
        ),
        "wrong shape 1 keys: pos_embed_input.weight (256, 48) (expected (256, 64))": _write(
            tmp_path / "shape.safetensors", {**cn_state, "pos_embed_input.weight": torch.zeros(256, 48)}
        ),
        "a ControlNet with 1 single blocks": _write(tmp_path / "single.safetensors", single),
        "damaged FLUX.1 ControlNet, missing txt_in.weight": _write(
            tmp_path / "damaged.safetensors", {k: v for k, v in cn_state.items() if k != "txt_in.weight"}
        ),
    }
    for expected, path in cases.items():
        with pytest.raises(UserError) as info:
            load_flux_controlnet(path, dtype=torch.float32, device="cpu", option="--controlnet")
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"--controlnet {path}: ") and expected in message, message


def test_controlnet_for_another_base_is_refused():
    controlnet = ControlNetParams(_params(hidden=384))
    check_controlnet_fits(controlnet, _params(hidden=384, depth=19, guidance=False), "--controlnet x")
    with pytest.raises(UserError, match=r"--controlnet x: made for another FLUX.1 model \(hidden_size 384 vs 256; "):
        check_controlnet_fits(controlnet, _params(), "--controlnet x")


def test_single_blocks_refused():
    with pytest.raises(ValueError, match="depth_single 1: single blocks are not supported"):
        ControlNetParams(_params(), depth=2, depth_single=1)


@pytest.mark.parametrize("shape", [(2, 3, 48, 48), (2, 3, 40, 32), (1, 3, 48, 32), (2, 1, 48, 32), (2, 3, 6, 4)])
def test_hint_size_must_match_the_latents(shape):
    """Latents of 6x4 (6 tokens) need a [2, 3, 48, 32] hint: not more tokens, sizes off the 16-pixel grid, another
    batch, grey images, or a latent-sized map."""
    inputs, _ = _inputs()
    controlnet = new_flux_controlnet(_base(_params()))
    with pytest.raises(ValueError, match=r"ControlNet hint of shape .* does not match the latents \(2 x 6 tokens\)"):
        controlnet(controlnet_cond=torch.zeros(shape), **inputs)


# --- parity with diffusers ---------------------------------------------------------------------------------------

HINT_BLOCK_NAMES = {0: "conv_in", 14: "conv_out", **{2 * j + 2: f"blocks.{j}" for j in range(6)}}
_BASE_ONLY = ("single_transformer_blocks.", "proj_out.", "norm_out.")


def _controlnet_state_to_diffusers(state: dict, base_state: dict, hidden: int) -> dict:
    """XLabs layout -> diffusers' FluxControlNetModel keys (as XLabs' "-diffusers" releases): the embedders and the
    double blocks through diffusers' own FLUX converter (handed the base model's single block 0 and final layer,
    which it requires, dropped afterwards); controlnet_blocks keep their names, pos_embed_input becomes
    controlnet_x_embedder, input_hint_block.{0, 2..12, 14} its conv_in, blocks.{0..5}, conv_out."""
    filler = {k: v for k, v in base_state.items() if k.startswith(("single_blocks.0.", "final_layer."))}
    shared = {k: v for k, v in state.items() if not k.startswith(HEAD_MODULES)}
    out = {
        k: v for k, v in flux_state_to_diffusers({**shared, **filler}, hidden).items() if not k.startswith(_BASE_ONLY)
    }
    for key, tensor in state.items():
        module, rest = key.split(".", 1)
        if module == "controlnet_blocks":
            out[key] = tensor
        elif module == "pos_embed_input":
            out[f"controlnet_x_embedder.{rest}"] = tensor
        elif module == "input_hint_block":
            index, suffix = rest.split(".")
            out[f"input_hint_block.{HINT_BLOCK_NAMES[int(index)]}.{suffix}"] = tensor
    return out


@pytest.fixture(scope="module")
def parity_setup():
    """Base FLUX.1 dev with 3 double blocks and a 2-block ControlNet, so the cyclic reuse (0, 1, 0) differs from
    diffusers' default spreading (0, 0, 1). 256 wide: tests.helpers patches the converter's hard-coded 3072 (the
    3072-wide check below runs diffusers' converter as it is)."""
    return _parity_models(depth=3, cn_depth=2, hidden=256)


def _parity_models(depth: int, cn_depth: int, hidden: int):
    params = _params(depth=depth, hidden=hidden)
    base_state = make_flux_state_dict(params, seed=1)
    cn_params = ControlNetParams(params, depth=cn_depth)
    cn_state = make_flux_controlnet_state_dict(cn_params, seed=2)
    with torch.device("meta"):  # built empty; the weights are the state dicts' tensors (shared: inference only)
        ours_base, ours_cn = Flux(params).eval(), FluxControlNet(cn_params).eval()
    ours_base.load_state_dict(base_state, strict=True, assign=True)
    ours_cn.load_state_dict(cn_state, strict=True, assign=True)

    heads = dict(num_attention_heads=params.num_heads, attention_head_dim=128, joint_attention_dim=CONTEXT,
                 pooled_projection_dim=VEC, guidance_embeds=True, in_channels=64)  # fmt: skip
    with torch.device("meta"):
        ref_base = FluxTransformer2DModel(num_layers=depth, num_single_layers=1, **heads)
        ref_cn = FluxControlNetModel(
            patch_size=2, num_layers=cn_depth, num_single_layers=0, conditioning_embedding_channels=16, **heads
        )
    ref_base.load_state_dict(flux_state_to_diffusers(base_state, params.hidden_size), strict=True, assign=True)
    ref_cn.load_state_dict(_controlnet_state_to_diffusers(cn_state, base_state, params.hidden_size), strict=True,
                           assign=True)  # fmt: skip
    return ours_base, ours_cn, ref_base.eval(), ref_cn.eval()


SCALE = 0.7


@torch.no_grad()
def _reference(ref_base, ref_cn, inputs, hint, repeat: bool = True):
    common = dict(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                  timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                  guidance=inputs["guidance"], return_dict=False)  # fmt: skip
    samples, single = ref_cn(controlnet_cond=hint, conditioning_scale=SCALE, **common)
    assert single is None
    output = ref_base(controlnet_block_samples=samples, controlnet_blocks_repeat=repeat, **common)[0]
    return [s / SCALE for s in samples], output


@torch.no_grad()
def _ours(ours_base, ours_cn, inputs, hint):
    samples = ours_cn(controlnet_cond=hint, **inputs)
    return samples, ours_base(**inputs, controlnet_block_samples=samples, controlnet_scale=SCALE)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_controlnet_matches_diffusers(parity_setup):
    ours_base, ours_cn, ref_base, ref_cn = parity_setup
    inputs, hint = _inputs()
    ref_samples, ref_out = _reference(ref_base, ref_cn, inputs, hint)
    samples, out = _ours(ours_base, ours_cn, inputs, hint)
    assert len(samples) == len(ref_samples) == 2
    for ours, ref in zip(samples, ref_samples, strict=True):
        assert _rel(ours, ref) <= 1e-4
    assert _rel(out, ref_out) <= 1e-4
    with torch.no_grad():
        assert _rel(ours_base(**inputs), ref_out) > 1e-2  # the ControlNet's part is large enough to be checked
    _, spread = _reference(ref_base, ref_cn, inputs, hint, repeat=False)
    assert _rel(out, spread) > 1e-3  # the cyclic reuse is what matches


def test_controlnet_matches_diffusers_on_a_3072_wide_model():
    """The real width, where diffusers' FLUX converter needs no patch: 2 double + 1 single base blocks, a 1-block
    ControlNet (about 0.8 G parameters in fp32 per side)."""
    ours_base, ours_cn, ref_base, ref_cn = _parity_models(depth=2, cn_depth=1, hidden=3072)
    inputs, hint = _inputs()
    ref_samples, ref_out = _reference(ref_base, ref_cn, inputs, hint)
    samples, out = _ours(ours_base, ours_cn, inputs, hint)
    assert len(samples) == len(ref_samples) == 1 and _rel(samples[0], ref_samples[0]) <= 1e-4
    assert _rel(out, ref_out) <= 1e-4
    with torch.no_grad():
        assert _rel(ours_base(**inputs), ref_out) > 1e-3  # the ControlNet's part is large enough to be checked


def test_parity_catches_a_transposed_hint(parity_setup, monkeypatch):
    ours_base, ours_cn, ref_base, ref_cn = parity_setup
    inputs, hint = _inputs()
    _, ref_out = _reference(ref_base, ref_cn, inputs, hint)
    pack = controlnet_module.pack_latents
    monkeypatch.setattr(controlnet_module, "pack_latents", lambda x: pack(x.transpose(2, 3)))
    assert _rel(_ours(ours_base, ours_cn, inputs, hint)[1], ref_out) > 1e-3


def test_unused_parameters_are_exactly_those_without_a_gradient():
    """Training freezes them (DDP needs a gradient for every trained parameter; the check in
    tests/e2e/test_multi_process.py found them): the last block's text-stream output layers."""
    base = _base(_params())
    inputs, hint = _inputs()
    controlnet = new_flux_controlnet(base).train()
    base(**inputs, controlnet_block_samples=controlnet(controlnet_cond=hint, **inputs)).square().mean().backward()
    no_grad = {id(p) for p in controlnet.parameters() if p.grad is None}
    assert no_grad and no_grad == {id(p) for p in controlnet.unused_parameters()}
