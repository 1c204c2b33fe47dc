"""Our FLUX.1 transformer against diffusers' FluxTransformer2DModel, loaded from the same BFL-layout file
through diffusers' own single-file converter. Diffusers' converter assumes hidden size 3072 and mlp ratio 4,
so the test model is 3072 wide with one block of each kind."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

import library.models.flux.layers as layers
from library.models.flux.loading import load_flux_model
from library.models.flux.sampling import pack_latents, prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    params = tiny_flux_params(hidden_size=3072, depth=1, depth_single_blocks=1, vec_in_dim=96, context_in_dim=80)
    path = tmp_path_factory.mktemp("flux3072") / "flux-parity.safetensors"
    save_file(make_flux_state_dict(params, seed=1), str(path))
    ours = load_flux_model(path, dtype=torch.float32)

    converted = convert_flux_transformer_checkpoint_to_diffusers(load_file(str(path)))
    with torch.device("meta"):
        reference = FluxTransformer2DModel(
            in_channels=64, num_layers=1, num_single_layers=1, joint_attention_dim=80,
            pooled_projection_dim=96, guidance_embeds=True,
        )  # fmt: skip
    reference.load_state_dict(converted, strict=True, assign=True)
    reference.eval()

    gen = torch.Generator().manual_seed(0)
    batch, height, width, txt_len = 2, 6, 4, 7  # latent 6x4 -> 3x2 patches; non-square catches h/w swaps
    latents = torch.randn(batch, 16, height, width, generator=gen)
    inputs = dict(
        img=pack_latents(latents),
        img_ids=prepare_img_ids(batch, height, width),
        txt=torch.randn(batch, txt_len, 80, generator=gen),
        txt_ids=torch.zeros(batch, txt_len, 3),
        y=torch.randn(batch, 96, generator=gen),
        timesteps=torch.tensor([0.3, 0.85]),
        guidance=torch.tensor([3.5, 1.0]),
    )
    return ours, reference, inputs


def _reference_output(reference, inputs):
    with torch.no_grad():
        return reference(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0],
            guidance=inputs["guidance"],
            return_dict=False,
        )[0]


def _max_rel_error(ours, reference, inputs) -> float:
    with torch.no_grad():
        out = ours(**inputs)
    expected = _reference_output(reference, inputs)
    return ((out - expected).abs().max() / expected.abs().max()).item()


def test_flux_matches_diffusers(parity_setup):
    ours, reference, inputs = parity_setup
    assert _max_rel_error(ours, reference, inputs) < 2e-5


def _wrong_rope(pos, dim, theta):
    return _original_rope(pos.flip(-1), dim, theta)


_original_rope = layers.rope


@pytest.mark.parametrize(
    "what,target,replacement",
    [
        ("rope positions", "rope", _wrong_rope),
        ("rope theta", "rope", lambda pos, dim, theta: _original_rope(pos, dim, theta * 2)),
        ("modulation order", "ModulationOut.modulate", lambda self, x: (1 + self.shift) * x + self.scale),
        ("qk norm", "QKNorm.forward", lambda self, q, k, v: (q.to(v), k.to(v))),
    ],
)
def test_parity_check_catches_broken_model(parity_setup, monkeypatch, what, target, replacement):
    """The comparison above must fail when the model is wrong in any of these ways."""
    ours, reference, inputs = parity_setup
    owner, _, attr = target.rpartition(".")
    monkeypatch.setattr(getattr(layers, owner) if owner else layers, attr, replacement)
    assert _max_rel_error(ours, reference, inputs) > 1e-3, what


def test_packing_catches_transposed_ids(parity_setup):
    ours, reference, inputs = parity_setup
    ids = inputs["img_ids"]
    swapped = dict(inputs, img_ids=ids[..., [0, 2, 1]])
    with torch.no_grad():
        assert ((ours(**swapped) - _reference_output(reference, inputs)).abs().max() > 1e-3).item()
