"""Saving full checkpoints: the streaming writer (``--mem_eff_save``) read back by safetensors, atomic against a
kill, one tensor in RAM at a time; FLUX.1, SD3 and text-encoder files taken strictly by diffusers/transformers
through their own converters and by our loaders, with the keys of the files users have."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint,
    convert_sd3_transformer_checkpoint_to_diffusers,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import library.io.safetensors_stream as stream
from library.io.safetensors_file import read_header
from library.io.safetensors_stream import PendingTensor, mem_eff_save_file, save_state
from library.models.checkpoint_kind import describe_checkpoint
from library.models.flux.loading import load_flux_model
from library.models.flux.saving import save_flux_checkpoint
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from library.models.sd3.loading import load_sd3_mmdit, load_sd3_vae
from library.models.sd3.saving import save_sd3_checkpoint
from library.models.text_encoders.clip import load_clip_text_model
from library.models.text_encoders.saving import save_text_encoder, text_encoder_path
from library.models.text_encoders.t5 import encode_t5, load_t5_encoder
from tests.helpers import REPO, flux_state_to_diffusers

META = {"modelspec.title": "saved", "modelspec.architecture": "x", "ss_steps": "7"}
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        got = actual[key]
        assert (got.dtype, tuple(got.shape)) == (value.dtype, tuple(value.shape)), key
        assert torch.equal(_bits(got), _bits(value)), key


def _sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for dtype in DTYPE_CODES:
        base = torch.randn(3, 5, generator=g) * 20
        state[f"{dtype}.w"] = base > 0 if dtype == torch.bool else base.abs().to(dtype)
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    state["transposed"] = torch.randn(4, 6, generator=g).t()  # not contiguous
    return state


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _raw_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


# ---- the streaming writer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["mapping", "pairs", "iterator", "pending"])
def test_stream_reads_back_what_save_file_writes(tmp_path, form):
    state = _sample_state()
    given = {
        "mapping": state,
        "pairs": list(state.items()),
        "iterator": iter(state.items()),
        "pending": {k: PendingTensor(tuple(v.shape), v.dtype, lambda v=v: v.clone()) for k, v in state.items()},
    }[form]
    path = tmp_path / "stream.safetensors"
    mem_eff_save_file(given, path, metadata={**META, "ss_epoch": 3})
    tensors, metadata = _read(path)
    _assert_same(tensors, state)
    assert metadata == {**META, "ss_epoch": "3"}

    reference = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(reference), metadata={**META, "ss_epoch": "3"})
    _assert_same(load_file(str(path)), load_file(str(reference)))  # load_file also checks the data has no holes

    length, header = _raw_header(path)
    assert (8 + length) % 256 == 0
    assert next(iter(header)) == "__metadata__"
    assert {header[f"{d}.w"]["dtype"] for d in DTYPE_CODES} == set(DTYPE_CODES.values())
    data_end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert path.stat().st_size == 8 + length + data_end
    assert read_header(path).metadata == metadata


@pytest.mark.parametrize(
    "reserve, chunk, layout",
    [(256, 1 << 20, "moved up"), (256, 64, "moved up in chunks"), (1 << 16, 1 << 20, "moved down"),
     (1 << 16, 64, "padded header")],
)  # fmt: skip
def test_one_pass_iterator_header_room(tmp_path, monkeypatch, reserve, chunk, layout):
    monkeypatch.setattr(stream, "ITERATOR_HEADER_RESERVE", reserve)
    monkeypatch.setattr(stream, "MOVE_CHUNK", chunk)
    state = {f"blocks.{i}.a_rather_long_tensor_name.weight": torch.full((7, i + 1), float(i)) for i in range(20)}
    path = tmp_path / "it.safetensors"
    mem_eff_save_file(iter(state.items()), path, metadata=META)
    tensors, metadata = _read(path)
    _assert_same(tensors, state)
    assert metadata == META
    length, _ = _raw_header(path)
    tight = 8 + len(path.read_bytes()[8 : 8 + length].rstrip())
    assert 8 + length == (reserve if layout == "padded header" else tight + (-tight % 256))
    _assert_same(load_file(str(path)), state)


def test_bad_input_fails_and_leaves_nothing(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match="'a' is given twice"):
        mem_eff_save_file([("a", torch.ones(1)), ("a", torch.ones(1))], path)
    with pytest.raises(ValueError, match="'c': dtype torch.complex64"):
        mem_eff_save_file({"c": torch.ones(2, dtype=torch.complex64)}, path)
    with pytest.raises(ValueError, match="'p': made"):
        mem_eff_save_file({"p": PendingTensor((2,), torch.float16, lambda: torch.ones(2))}, path)
    assert list(tmp_path.iterdir()) == []


def test_error_mid_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    old = {"w": torch.arange(4.0)}
    mem_eff_save_file(old, path, metadata=META)

    def failing():
        yield "a", torch.zeros(1000)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mem_eff_save_file(failing(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    _assert_same(load_file(str(path)), old)


_KILLED_WRITER = """
import os, signal, sys, torch
from library.io.safetensors_stream import mem_eff_save_file
def tensors():
    for i in range(3):
        yield f"t{i}", torch.full((1 << 18,), float(i))
    os.kill(os.getpid(), signal.SIGKILL)
    yield "never", torch.ones(1)
mem_eff_save_file(tensors(), sys.argv[1])
"""


def test_kill_mid_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "model.safetensors"
    old = {"w": torch.arange(4.0)}
    mem_eff_save_file(old, path, metadata=META)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path)], env=env, capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    tensors, metadata = _read(path)
    _assert_same(tensors, old)
    assert metadata == META
    partial = [p for p in tmp_path.iterdir() if p != path]
    assert len(partial) == 1 and partial[0].stat().st_size >= 3 * 4 * (1 << 18)  # the kill came mid-write


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Producer:
    """Makes large tensors on demand and records how many are alive and how much RSS grew when each is made."""

    def __init__(self, count: int, numel: int):
        self.count, self.numel = count, numel
        self.alive = self.peak_alive = 0
        self.rss_growth: list[int] = []
        self._start = _rss()

    @property
    def nbytes(self) -> int:
        return 4 * self.numel

    def _released(self) -> None:
        self.alive -= 1

    def make(self, i: int) -> torch.Tensor:
        self.rss_growth.append(_rss() - self._start)
        tensor = torch.full((self.numel,), float(i))
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        weakref.finalize(tensor, self._released)
        return tensor

    def pairs(self):
        for i in range(self.count):
            yield f"t{i}", self.make(i)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize("form", ["iterator", "pending"])
def test_stream_holds_one_tensor_at_a_time(tmp_path, form):
    producer = _Producer(count=6, numel=16 << 20)  # 64 MiB each
    if form == "iterator":
        given = producer.pairs()
    else:
        given = {
            f"t{i}": PendingTensor((producer.numel,), torch.float32, lambda i=i: producer.make(i)) for i in range(6)
        }
    mem_eff_save_file(given, tmp_path / "big.safetensors")
    assert producer.peak_alive == 1
    assert max(producer.rss_growth) < 1.5 * producer.nbytes
    assert read_header(tmp_path / "big.safetensors").shape("t5") == (producer.numel,)

    control = _Producer(count=6, numel=16 << 20)
    held = dict(control.pairs())  # what building the whole state first costs: the counters can fail
    assert control.peak_alive == 6 and max(control.rss_growth) > 4 * control.nbytes
    del held


def test_save_state_casts_floats_only_and_keeps_tied_tensors_apart(tmp_path):
    shared = torch.randn(4, 3)
    state = {"embed": shared, "shared": shared, "ids": torch.arange(3), "norm": torch.ones(3)}
    for mem_eff in (False, True):
        path = tmp_path / f"s{mem_eff}.safetensors"
        save_state(state, path, dtype=torch.bfloat16, metadata={"n": 1}, mem_eff=mem_eff)
        tensors, metadata = _read(path)
        _assert_same(tensors, {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()})
        assert metadata == {"n": "1"}


@pytest.mark.gpu
def test_stream_moves_cuda_tensors_one_by_one(tmp_path):
    state = {f"t{i}": torch.randn(1024, 1024, device="cuda") for i in range(4)}
    save_state(state, tmp_path / "cuda.safetensors", dtype=torch.bfloat16, metadata=META, mem_eff=True)
    tensors, _ = _read(tmp_path / "cuda.safetensors")
    _assert_same(tensors, {k: v.to(torch.bfloat16).cpu() for k, v in state.items()})


# ---- FLUX.1 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    params = tiny_flux_params(depth=1, depth_single_blocks=2)
    state = make_flux_state_dict(params, seed=5)
    path = tmp_path_factory.mktemp("flux_save") / "flux1-dev-tiny.safetensors"
    save_file(state, str(path))
    return params, state, path


def _diffusers_flux(state: dict[str, torch.Tensor], params) -> FluxTransformer2DModel:
    converted = flux_state_to_diffusers(state, params.hidden_size)
    with torch.device("meta"):
        reference = FluxTransformer2DModel(
            in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
            attention_head_dim=params.hidden_size // params.num_heads, num_attention_heads=params.num_heads,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.vec_in_dim, guidance_embeds=True,
        )  # fmt: skip
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference


@pytest.mark.parametrize("mem_eff", [False, True])
def test_flux_checkpoint_loads_in_diffusers_and_ours(flux_file, tmp_path, mem_eff):
    params, state, path = flux_file
    model = load_flux_model(path, dtype=torch.float32)
    out = tmp_path / "trained.safetensors"
    save_flux_checkpoint(model, out, dtype=torch.bfloat16, metadata=META, mem_eff=mem_eff)

    header = read_header(out)
    assert set(header.keys()) == set(state)  # BFL's bare keys, no prefix
    assert header.dtypes() == {"BF16"} and header.metadata == META
    expected = {k: v.to(torch.bfloat16) for k, v in state.items()}
    saved = load_file(str(out))
    _assert_same(saved, expected)
    assert infer_diffusers_model_type(saved) == "flux-dev"  # what diffusers' from_single_file reads
    reference = _diffusers_flux(saved, params)
    _assert_same(reference.state_dict(), flux_state_to_diffusers(expected, params.hidden_size))
    _assert_same(load_flux_model(out, dtype=torch.bfloat16).state_dict(), expected)


def test_flux_fp8_weights_are_written_in_the_requested_dtype(flux_file, tmp_path):
    _, state, path = flux_file
    model = load_flux_model(path, dtype=torch.float32, fp8_linear=True)
    weights = model.state_dict()
    fp8_keys = {k for k, v in weights.items() if v.dtype == torch.float8_e4m3fn}
    assert "double_blocks.0.img_attn.qkv.weight" in fp8_keys

    out = tmp_path / "bf16.safetensors"
    save_flux_checkpoint(model, out, dtype=torch.bfloat16, metadata=META, mem_eff=True)
    assert read_header(out).dtypes() == {"BF16"}
    _assert_same(load_file(str(out)), {k: v.to(torch.bfloat16) for k, v in weights.items()})

    kept = tmp_path / "kept.safetensors"
    save_flux_checkpoint(model, kept, dtype=None, metadata=None)
    header = read_header(kept)
    assert {k for k in header.keys() if header.tensors[k].dtype == "F8_E4M3"} == fp8_keys
    assert header.metadata == {}
    _assert_same(load_flux_model(kept, dtype=torch.float32, fp8_linear=True).state_dict(), weights)


def test_flux_saver_refuses_a_wrapped_model(tmp_path):
    with pytest.raises(TypeError, match="unwrapped FLUX.1 model"):
        save_flux_checkpoint(nn.Linear(2, 2), tmp_path / "x.safetensors", dtype=None, metadata=None)


# ---- SD3 / SD3.5 -------------------------------------------------------------------------------------------------


def _diffusers_sd3(state: dict[str, torch.Tensor], params) -> SD3Transformer2DModel:
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    with torch.device("meta"):
        reference = SD3Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=params.depth, attention_head_dim=64,
            num_attention_heads=params.depth, caption_projection_dim=64 * params.depth,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.adm_in_dim,
            pos_embed_max_size=params.pos_embed_max_size, qk_norm="rms_norm" if params.qk_norm else None,
            dual_attention_layers=params.x_block_self_attn_layers,
        )  # fmt: skip
    reference.load_state_dict(converted, strict=True, assign=True)
    return reference


def _vae_config(params) -> dict:
    levels = len(params.ch_mult)
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=params.channels,
        layers_per_block=params.num_res_blocks, latent_channels=16, norm_num_groups=32, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def _diffusers_vae(state: dict[str, torch.Tensor], params) -> AutoencoderKL:
    config = _vae_config(params)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), config), strict=True, assign=True)
    return vae


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    "role, mem_eff", [("sd3_medium", False), ("sd3_5_medium", True), ("sd3_medium_incl_clips", True)]
)
def test_sd3_checkpoint_is_sais_single_file(tiny_sd3_models, tmp_path, role, mem_eff):
    source = tiny_sd3_models[role]
    mmdit, vae = load_sd3_mmdit(source, dtype=torch.float32), load_sd3_vae(source)
    out = tmp_path / "trained.safetensors"
    save_sd3_checkpoint(mmdit, vae, out, dtype=torch.float16, metadata=META, mem_eff=mem_eff)

    header = read_header(out)
    source_keys = read_header(source).keys()
    assert set(header.keys()) == {k for k in source_keys if not k.startswith("text_encoders.")}
    assert header.dtypes() == {"F16"} and header.metadata == META
    assert describe_checkpoint(header) == f"SD3/SD3.5 MMDiT checkpoint ({mmdit.params.display_name}, with VAE)"
    expected = {k: v.half() for k, v in load_file(str(source)).items() if not k.startswith("text_encoders.")}
    saved = load_file(str(out))
    _assert_same(saved, expected)

    reference = _diffusers_sd3(_part(saved, "model.diffusion_model."), mmdit.params)
    expected_mmdit = convert_sd3_transformer_checkpoint_to_diffusers(_part(expected, "model.diffusion_model."))
    _assert_same(reference.state_dict(), expected_mmdit)
    reference_vae = _diffusers_vae(_part(saved, "first_stage_model."), vae.params)
    expected_vae = convert_ldm_vae_checkpoint(_part(expected, "first_stage_model."), _vae_config(vae.params))
    _assert_same(reference_vae.state_dict(), expected_vae)

    reloaded = load_sd3_mmdit(out, dtype=torch.float16)
    _assert_same(reloaded.state_dict(), _part(expected, "model.diffusion_model."))
    _assert_same(load_sd3_vae(out, dtype=torch.float16).state_dict(), _part(expected, "first_stage_model."))


# ---- text encoders -----------------------------------------------------------------------------------------------


def _ids(vocab: int = 49408) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 77), generator=torch.Generator().manual_seed(1))


def _clip_outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return [out.last_hidden_state, *out.hidden_states] + ([out.text_embeds] if hasattr(out, "text_embeds") else [])


def _assert_outputs_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_text_encoder_paths_follow_upstream():
    assert text_encoder_path("out/sd3-000002.safetensors", "clip_l") == Path("out/sd3-000002_clip_l.safetensors")
    assert text_encoder_path(Path("o/m.safetensors"), "t5xxl") == Path("o/m_t5xxl.safetensors")
    with pytest.raises(ValueError, match="clip_x"):
        text_encoder_path("m.safetensors", "clip_x")


@pytest.mark.parametrize("mem_eff", [False, True])
def test_clip_g_round_trip_and_transformers_strict(tiny_sd3_models, tmp_path, mem_eff):
    source = tiny_sd3_models["clip_g"]
    model = load_clip_text_model(source, expect_width=1280, option="--clip_g")
    out = text_encoder_path(tmp_path / "sd3.safetensors", "clip_g")
    save_text_encoder(model, out, kind="clip_g", dtype=None, mem_eff=mem_eff)
    assert set(read_header(out).keys()) == set(read_header(source).keys())
    assert describe_checkpoint(read_header(out)).startswith("CLIP")

    ids = _ids()
    expected = _clip_outputs(model, ids)
    _assert_outputs_equal(_clip_outputs(load_clip_text_model(out, expect_width=1280, option="--clip_g"), ids), expected)
    hf = CLIPTextModelWithProjection(model.config)
    hf.load_state_dict(load_file(str(out)), strict=True)
    _assert_outputs_equal(_clip_outputs(hf.eval(), ids), expected)


def test_clip_l_identity_projection_is_not_written_but_a_trained_one_is(tiny_sd3_models, tmp_path):
    source = tiny_sd3_models["clip_l"]
    model = load_clip_text_model(source, with_projection=True)  # SD3's CLIP-L: identity projection added
    out = tmp_path / "m_clip_l.safetensors"
    save_text_encoder(model, out, kind="clip_l", dtype=None, mem_eff=True)
    assert set(read_header(out).keys()) == set(read_header(source).keys())  # no text_projection.weight
    ids = _ids()
    _assert_outputs_equal(
        _clip_outputs(load_clip_text_model(out, with_projection=True), ids), _clip_outputs(model, ids)
    )
    hf = CLIPTextModel(model.config)
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in load_file(str(out)).items()}, strict=True)
    _assert_outputs_equal(_clip_outputs(hf.eval(), ids), _clip_outputs(model, ids)[:-1])

    kept = tmp_path / "kept_clip_l.safetensors"
    save_text_encoder(model, kept, kind="clip_l", dtype=None, keep_projection=True)
    assert "text_projection.weight" in read_header(kept)

    with torch.no_grad():
        model.text_projection.weight.add_(0.01 * torch.randn_like(model.text_projection.weight))  # as training does
    trained = tmp_path / "trained_clip_l.safetensors"
    save_text_encoder(model, trained, kind="clip_l", dtype=None)
    assert "text_projection.weight" in read_header(trained)
    _assert_outputs_equal(_clip_outputs(load_clip_text_model(trained), ids), _clip_outputs(model, ids))


@pytest.mark.parametrize("mem_eff", [False, True])
def test_t5_round_trip_writes_the_embedding_the_encoder_uses(tiny_sd3_models, tmp_path, mem_eff):
    source = tiny_sd3_models["t5xxl"]
    model = load_t5_encoder(source)
    with torch.no_grad():  # untie as loading a file with both keys does, then train only the encoder's copy
        model.encoder.embed_tokens.weight = nn.Parameter(model.shared.weight + 0.5, requires_grad=False)
    out = tmp_path / "m_t5xxl.safetensors"
    save_text_encoder(model, out, kind="t5xxl", dtype=torch.bfloat16, mem_eff=mem_eff)
    header = read_header(out)
    assert set(header.keys()) == set(read_header(source).keys()) | {"encoder.embed_tokens.weight"}
    assert header.dtypes() == {"BF16"}
    saved = load_file(str(out))
    _assert_same({"shared.weight": saved["shared.weight"]},
                 {"shared.weight": model.encoder.embed_tokens.weight.to(torch.bfloat16)})  # fmt: skip

    model = model.to(torch.bfloat16)
    ids = _ids(32128)[:, :16]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = encode_t5(model, ids, mask, apply_attn_mask=False)
        reloaded = load_t5_encoder(out, dtype=torch.bfloat16)
        assert torch.equal(encode_t5(reloaded, ids, mask, apply_attn_mask=False), expected)


def test_text_encoder_kind_must_match_the_model(tiny_sd3_models, tmp_path):
    model = load_clip_text_model(tiny_sd3_models["clip_l"])
    with pytest.raises(TypeError, match="t5xxl: expected"):
        save_text_encoder(model, tmp_path / "x.safetensors", kind="t5xxl", dtype=None)
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        save_text_encoder(model, tmp_path / "x.safetensors", kind="clip", dtype=None)
