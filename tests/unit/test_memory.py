from __future__ import annotations

import torch

from library.memory.checkpointing import disable_block_checkpointing, enable_block_checkpointing
from library.models.flux.model import Flux
from library.models.flux.sampling import prepare_img_ids
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params


def test_block_checkpointing_gives_the_same_gradients():
    params = tiny_flux_params(depth=1, depth_single_blocks=1, vec_in_dim=32, context_in_dim=32)
    model = Flux(params)
    model.load_state_dict(make_flux_state_dict(params, seed=0))
    inputs = dict(img=torch.randn(1, 4, 64), img_ids=prepare_img_ids(1, 4, 4), txt=torch.randn(1, 3, 32),
                  txt_ids=torch.zeros(1, 3, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, 32),
                  guidance=torch.tensor([3.5]))  # fmt: skip

    def grads():
        model.zero_grad()
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    blocks = [*model.double_blocks, *model.single_blocks]
    assert enable_block_checkpointing(blocks) == 2
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
    disable_block_checkpointing(blocks)
    assert all("forward" not in b.__dict__ for b in blocks)
