from __future__ import annotations

import weakref

import pytest
import torch

from library.memory.checkpointing import HostStash, disable_block_checkpointing, enable_block_checkpointing
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


class HostCopies:
    """A stash simulating host memory on the CPU: each saved tensor is held as a separate copy."""

    def __init__(self):
        self.packed, self.unpacked = [], 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.detach().clone()
        self.packed.append(tuple(tensor.shape))
        return copy

    def unpack(self, copy: torch.Tensor) -> torch.Tensor:
        self.unpacked += 1
        return copy


def _tiny_flux():
    params = tiny_flux_params(depth=2, depth_single_blocks=2, vec_in_dim=32, context_in_dim=32)
    model = Flux(params)
    model.load_state_dict(make_flux_state_dict(params, seed=0))
    inputs = dict(img=torch.randn(1, 4, 64), img_ids=prepare_img_ids(1, 4, 4), txt=torch.randn(1, 3, 32),
                  txt_ids=torch.zeros(1, 3, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, 32),
                  guidance=torch.tensor([3.5]))  # fmt: skip
    return model, inputs


def test_cpu_offload_checkpointing_holds_block_inputs_off_the_device_with_the_same_gradients():
    model, inputs = _tiny_flux()
    blocks = [*model.double_blocks, *model.single_blocks]
    held = []

    def watch(block, args, kwargs):  # the activations a block is called with (FLUX passes them by keyword)
        for value in (*args, *(kwargs[k] for k in ("img", "txt") if k in kwargs)):
            held.append(weakref.ref(value))

    for block in blocks:
        block.register_forward_pre_hook(watch, with_kwargs=True)

    def run():
        held.clear()
        model.zero_grad()
        out = model(**inputs)
        alive = sum(ref() is not None for ref in held)
        out.square().mean().backward()
        return alive, {n: p.grad.clone() for n, p in model.named_parameters()}

    enable_block_checkpointing(blocks)
    alive_plain, plain = run()
    assert alive_plain == len(held) == 2 * 2 + 2  # checkpointing keeps every block input for the recompute
    disable_block_checkpointing(blocks)
    stash = HostCopies()
    assert enable_block_checkpointing(blocks, cpu_offload=True, stash=stash) == 4
    alive_offload, offloaded = run()
    assert alive_offload == 0  # only the stash's copies are held between forward and backward
    hidden = model.params.hidden_size
    assert stash.packed.count((1, 4, hidden)) == 2 and stash.packed.count((1, 3, hidden)) == 2  # img, txt
    assert stash.packed.count((1, 7, hidden)) == 2  # the single blocks' joined sequence
    assert stash.unpacked == len(stash.packed) == 2 * 4 + 2 * 3  # + vec and pe of each block
    for name, grad in plain.items():
        assert torch.equal(offloaded[name], grad), name


def test_host_stash_round_trip():
    stash = HostStash()
    tensor = torch.randn(3, 4)
    assert torch.equal(stash.unpack(stash.pack(tensor)), tensor)


@pytest.mark.gpu
def test_host_stash_moves_saved_block_inputs_to_pinned_host_memory():
    model, inputs = _tiny_flux()
    model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    blocks = [*model.double_blocks, *model.single_blocks]
    enable_block_checkpointing(blocks)
    model(**inputs).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    disable_block_checkpointing(blocks)
    enable_block_checkpointing(blocks, cpu_offload=True)
    packed = []
    stash_pack = HostStash.pack
    HostStash.pack = lambda self, t: packed.append(stash_pack(self, t)) or packed[-1]
    try:
        model(**inputs).square().mean().backward()
    finally:
        HostStash.pack = stash_pack
    assert packed and all(host.device.type == "cpu" and host.is_pinned() and device.type == "cuda"
                          for device, host in packed)  # fmt: skip
    for name, grad in plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=0, atol=0, msg=name)
