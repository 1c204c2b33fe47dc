"""tools/convert_diffusers_to_flux.py: a diffusers-layout FLUX.1 back to the exact BFL tensors."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from tests.helpers import flux_state_to_diffusers, run_script


def test_diffusers_folder_to_bfl_file(tmp_path):
    params = tiny_flux_params(depth=1, depth_single_blocks=2, vec_in_dim=32, context_in_dim=32)
    state = make_flux_state_dict(params, seed=5, dtype=torch.bfloat16)
    folder = tmp_path / "FLUX.1-dev" / "transformer"
    folder.mkdir(parents=True)
    save_file(flux_state_to_diffusers(state, params.hidden_size), str(folder / "diffusion_pytorch_model.safetensors"))

    out = tmp_path / "flux1-dev.safetensors"
    args = ["--diffusers_path", str(tmp_path / "FLUX.1-dev"), "--save_to", str(out)]
    result = run_script("tools/convert_diffusers_to_flux.py", *args)
    assert result.returncode == 0, result.stderr
    converted = load_file(str(out))
    assert set(converted) == set(state)
    for key, value in state.items():
        assert converted[key].dtype == torch.bfloat16
        assert torch.equal(converted[key], value), key

    again = run_script(
        "tools/convert_diffusers_to_flux.py", "--diffusers_path", str(out), "--save_to", str(tmp_path / "x.safetensors")
    )
    assert again.returncode == 2 and "already in BFL layout" in again.stderr and "Traceback" not in again.stderr
