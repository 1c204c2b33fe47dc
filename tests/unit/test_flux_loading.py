"""Loading FLUX.1 transformers from every layout and dtype users have, and refusing wrong files clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from library.errors import UserError
from library.memory.fp8 import enable_fp8_linear
from library.models.flux.loading import load_flux_model, open_flux_checkpoint
from library.models.flux.sampling import prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from tests.helpers import flux_state_to_diffusers

OPTION = "--pretrained_model_name_or_path"


@pytest.fixture(scope="module")
def tiny_state():
    params = tiny_flux_params(depth=2, depth_single_blocks=3, vec_in_dim=32, context_in_dim=48)
    return params, make_flux_state_dict(params, seed=3)


def _save(state, path, dtype=None):
    save_file({k: v.to(dtype) if dtype else v for k, v in state.items()}, str(path))
    return path


def _inputs(params, batch=1):
    gen = torch.Generator().manual_seed(0)
    return dict(
        img=torch.randn(batch, 4, params.in_channels, generator=gen),
        img_ids=prepare_img_ids(batch, 4, 4),
        txt=torch.randn(batch, 5, params.context_in_dim, generator=gen),
        txt_ids=torch.zeros(batch, 5, 3),
        y=torch.randn(batch, params.vec_in_dim, generator=gen),
        timesteps=torch.full((batch,), 0.5),
        guidance=torch.full((batch,), 3.5) if params.guidance_embed else None,
    )


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key].float(), value.float(), rtol=0, atol=0, msg=key)


def test_architecture_is_read_from_tensors(tiny_state, tmp_path):
    params, state = tiny_state
    checkpoint = open_flux_checkpoint(_save(state, tmp_path / "f.safetensors"))
    assert checkpoint.params == params
    assert checkpoint.params.variant == "dev"


def test_schnell_has_no_guidance(tmp_path):
    params = tiny_flux_params(depth=1, depth_single_blocks=1, guidance_embed=False)
    model = load_flux_model(_save(make_flux_state_dict(params), tmp_path / "s.safetensors"), dtype=torch.float32)
    assert model.params.variant == "schnell"
    assert model(**_inputs(params)).shape == (1, 4, 64)


def test_comfyui_prefix(tiny_state, tmp_path):
    params, state = tiny_state
    prefixed = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    prefixed["vae.decoder.conv_in.weight"] = torch.zeros(1)  # other parts of a full checkpoint are ignored
    model = load_flux_model(_save(prefixed, tmp_path / "p.safetensors"), dtype=torch.float32)
    _assert_same_weights(model, state)


def test_diffusers_file_and_sharded_folder(tiny_state, tmp_path):
    params, state = tiny_state
    # diffusers' own converter hard-codes a 3072 width; rebuild the split sizes for our tiny width by hand
    diffusers_state = flux_state_to_diffusers(state, params.hidden_size)
    model = load_flux_model(_save(diffusers_state, tmp_path / "d.safetensors"), dtype=torch.float32)
    _assert_same_weights(model, state)

    folder = tmp_path / "FLUX.1-dev" / "transformer"
    folder.mkdir(parents=True)
    keys = sorted(diffusers_state)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        save_file(
            {k: diffusers_state[k] for k in part}, str(folder / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors")
        )
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    _assert_same_weights(load_flux_model(tmp_path / "FLUX.1-dev", dtype=torch.float32), state)
    shard = folder / "diffusion_pytorch_model-00001-of-00002.safetensors"
    _assert_same_weights(load_flux_model(shard, dtype=torch.float32), state)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_file_dtypes_load_in_requested_dtype(tiny_state, tmp_path, file_dtype):
    params, state = tiny_state
    path = _save(state, tmp_path / "x.safetensors", file_dtype)
    model = load_flux_model(path, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    reference = load_flux_model(_save(state, tmp_path / "ref.safetensors"), dtype=torch.float32)
    out, expected = model(**_inputs(params)), reference(**_inputs(params))
    tolerance = {torch.bfloat16: 0.05, torch.float16: 0.01, torch.float8_e4m3fn: 0.25}[file_dtype]
    assert ((out - expected).abs().max() / expected.abs().max()).item() < tolerance


def test_fp8_linear_storage(tiny_state, tmp_path):
    params, state = tiny_state
    path = _save(state, tmp_path / "x.safetensors")
    model = load_flux_model(path, dtype=torch.float32, fp8_linear=True)
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.bias.dtype == torch.float32
    assert model.img_in.weight.dtype == torch.float32
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    assert enable_fp8_linear(model) == 2 * 10 + 3 * 3  # double: 2 streams x (qkv, proj, mlp.0, mlp.2, mod); single: 3
    reference = load_flux_model(path, dtype=torch.float32)
    out, expected = model(**_inputs(params)), reference(**_inputs(params))
    assert ((out - expected).abs().max() / expected.abs().max()).item() < 0.25


def test_missing_and_unexpected_keys_are_named(tiny_state, tmp_path):
    _, state = tiny_state
    broken = {k: v for k, v in state.items() if k != "double_blocks.1.txt_mlp.2.bias"}
    with pytest.raises(UserError, match=r"missing 1 keys: double_blocks\.1\.txt_mlp\.2\.bias"):
        load_flux_model(_save(broken, tmp_path / "m.safetensors"))
    extra = dict(state, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(UserError, match=r"unexpected 1 keys: double_blocks\.0\.img_attn\.extra\.weight"):
        load_flux_model(_save(extra, tmp_path / "u.safetensors"))


def _one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_wrong_files(tmp_path):
    sd3 = _save(
        {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4, 4)},
        tmp_path / "sd3.safetensors",
    )
    ae = _save(
        {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(512, 16, 3, 3)},
        tmp_path / "ae.safetensors",
    )
    text = tmp_path / "notes.safetensors"
    text.write_text("this is a text file, not a model\n" * 10)
    pickle = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, pickle)
    cases = {
        sd3: "SD3/SD3.5 MMDiT checkpoint",
        ae: "16-channel autoencoder",
        text: "is not a safetensors file",
        pickle: "pickle checkpoint",
        tmp_path / "missing.safetensors": "file not found",
    }
    for path, found in cases.items():
        with pytest.raises(UserError) as error:
            load_flux_model(path, option=OPTION)
        _one_line(error, OPTION, str(path), found)


def test_truncated_file(tiny_state, tmp_path):
    _, state = tiny_state
    path = _save(state, tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as error:
        load_flux_model(path, option=OPTION)
    _one_line(error, OPTION, str(path), "truncated")


def test_a_safetensors_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """Pickles (protocol 2+) start with byte 0x80, and so does a safetensors file whose header is 128 + 256 k bytes
    long: one in 32 files. The JSON header that follows tells them apart."""
    import json
    import struct

    from library.io.safetensors_file import read_header

    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0x80 - len(header))
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    assert path.read_bytes()[0] == 0x80
    assert read_header(path, OPTION).keys() == ["x"]


def test_loading_onto_the_per_process_cpu_device(tiny_state, tmp_path):
    """accelerate gives each CPU process the device ``cpu:0``, which safetensors' safe_open refuses."""
    _, state = tiny_state
    path = _save(state, tmp_path / "t.safetensors")
    model = load_flux_model(path, dtype=torch.float32, device=torch.device("cpu", 0), option=OPTION)
    assert next(model.parameters()).device.type == "cpu"
