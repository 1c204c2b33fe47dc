from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.memory.checkpointing import CHECKPOINT_KEY, disable_block_checkpointing, enable_block_checkpointing
from library.memory.fp8 import FP8_KEY, cast_linear_weights_to_fp8, disable_fp8_linear, enable_fp8_linear
from library.memory.wrappers import Layer, attach, attached, detach
from networks.lora import LoRAModule

RANK, ALPHA = 4, 2.0


class Block(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x))) * scale


def make_block() -> tuple[Block, list[LoRAModule]]:
    torch.manual_seed(0)
    block = Block()
    cast_linear_weights_to_fp8(block)
    loras = [LoRAModule(f"lora_{name}", layer, lora_dim=RANK, alpha=ALPHA) for name, layer in
             (("fc1", block.fc1), ("fc2", block.fc2))]  # fmt: skip
    with torch.no_grad():
        for lora in loras:
            for param in lora.parameters():
                param.normal_(0, 0.3)
    return block, loras


def reference(block: Block, loras: list[LoRAModule | None], x, scale) -> torch.Tensor:
    """The block's math written out: fp8 weights upcast, plus each given LoRA's ``alpha / rank * up(down(x))``."""

    def linear(layer: nn.Linear, lora: LoRAModule | None, h):
        out = F.linear(h, layer.weight.float(), layer.bias)
        if lora is not None:
            out = out + h @ lora.lora_down.weight.T @ lora.lora_up.weight.T * (ALPHA / RANK)
        return out

    return x + linear(block.fc2, loras[1], F.gelu(linear(block.fc1, loras[0], x))) * scale


def outputs_and_grads(fn, loras, x, scale):
    x = x.clone().requires_grad_(True)
    for lora in loras:
        lora.zero_grad(set_to_none=True)
    out = fn(x, scale)
    out.square().sum().backward()
    grads = [p.grad.clone() for lora in loras for p in lora.parameters() if p.grad is not None]
    return out.detach(), x.grad.clone(), grads


def module_state(block: Block) -> dict[str, set]:
    return {name: set(m.__dict__) for name, m in block.named_modules()}


FEATURES = {
    "fp8": (lambda block, loras: enable_fp8_linear(block), lambda block, loras: disable_fp8_linear(block)),
    "lora": (lambda block, loras: [m.apply_to() for m in loras], lambda block, loras: [m.remove() for m in loras]),
    "checkpoint": (lambda block, loras: enable_block_checkpointing([block]),
                   lambda block, loras: disable_block_checkpointing([block])),
}  # fmt: skip


def canonical_layers(block: Block) -> list[list[Layer]]:
    return [[layer for layer, _ in attached(m)] for m in (block, block.fc1, block.fc2)]


@pytest.mark.parametrize("attach_order", list(itertools.permutations(FEATURES)), ids="-".join)
def test_any_attach_and_detach_order_gives_the_reference_and_leaves_the_module_pristine(attach_order):
    block, loras = make_block()
    x, scale = torch.randn(2, 3, 16), torch.tensor(0.7)
    pristine = module_state(block)
    expected = {}
    for lora_on in (False, True):
        active_loras = loras if lora_on else [None, None]
        expected[lora_on] = outputs_and_grads(lambda x, s, a=active_loras: reference(block, a, x, s), loras, x, scale)

    def check(active: set[str]) -> None:
        if "fp8" not in active:  # without the upcast an fp8 Linear cannot run at all
            return
        out, x_grad, grads = outputs_and_grads(lambda x, s: block(x, scale=s), loras, x, scale)
        ref_out, ref_x_grad, ref_grads = expected["lora" in active]
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(x_grad, ref_x_grad, rtol=1e-6, atol=1e-7)
        assert len(grads) == (4 if "lora" in active else 0)
        for grad, ref in zip(grads, ref_grads):
            torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-7)

    active: set[str] = set()
    for name in attach_order:
        FEATURES[name][0](block, loras)
        active.add(name)
        check(active)
    # whatever the order, the chain reads innermost first: fp8, LoRA on the layers; checkpointing on the block
    assert canonical_layers(block) == [[Layer.CHECKPOINT], [Layer.BASE, Layer.ADAPTER], [Layer.BASE, Layer.ADAPTER]]
    dispatchers = [m.__dict__["forward"] for m in (block, block.fc1, block.fc2)]
    for detach_order in itertools.permutations(FEATURES):
        for name in detach_order:
            FEATURES[name][1](block, loras)
            active.discard(name)
            check(active)
            assert all(m.__dict__.get("forward") in (None, d) for m, d in zip((block, block.fc1, block.fc2),
                                                                              dispatchers))  # fmt: skip
        assert module_state(block) == pristine
        assert all("forward" not in m.__dict__ for m in block.modules())
        for name in attach_order:
            FEATURES[name][0](block, loras)
            active.add(name)
        check(active)


def test_a_forward_patched_before_the_chain_is_kept_under_it_and_restored():
    layer = nn.Linear(4, 4)
    calls = []

    def foreign(x):
        calls.append(x.shape)
        return torch.zeros(2, 4)

    layer.forward = foreign
    attach(layer, Layer.ADAPTER, "plus_one", lambda module, inner, x: inner(x) + 1)
    assert torch.equal(layer(torch.randn(2, 4)), torch.ones(2, 4)) and calls == [(2, 4)]
    detach(layer, "plus_one")
    assert layer.__dict__["forward"] is foreign


def test_adapters_stack_in_attach_order_other_layers_hold_one():
    layer = nn.Linear(4, 4, bias=False)
    nn.init.eye_(layer.weight)
    attach(layer, Layer.ADAPTER, "times_two", lambda module, inner, x: inner(x) * 2)
    attach(layer, Layer.ADAPTER, "plus_one", lambda module, inner, x: inner(x) + 1)
    assert torch.equal(layer(torch.zeros(1, 4)), torch.ones(1, 4))  # (0 * 2) + 1
    detach(layer, "times_two")
    attach(layer, Layer.ADAPTER, "times_two", lambda module, inner, x: inner(x) * 2)
    assert torch.equal(layer(torch.zeros(1, 4)), torch.full((1, 4), 2.0))  # (0 + 1) * 2
    attach(layer, Layer.BASE, FP8_KEY, lambda module, inner, x: inner(x))
    with pytest.raises(RuntimeError, match="BASE already holds"):
        attach(layer, Layer.BASE, "another", lambda module, inner, x: inner(x))
    with pytest.raises(RuntimeError, match="already attached"):
        attach(layer, Layer.ADAPTER, "plus_one", lambda module, inner, x: inner(x))
    with pytest.raises(RuntimeError, match="is not attached"):
        detach(layer, CHECKPOINT_KEY)


def test_lora_refuses_double_apply_and_remove():
    block, loras = make_block()
    loras[0].apply_to()
    with pytest.raises(RuntimeError, match="already applied"):
        loras[0].apply_to()
    loras[0].remove()
    with pytest.raises(RuntimeError, match="not applied"):
        loras[0].remove()


def test_torch_compile_of_the_block_runs_the_whole_chain_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    block, loras = make_block()
    x, scale = torch.randn(2, 3, 16), torch.tensor(0.7)
    enable_block_checkpointing([block])
    enable_fp8_linear(block)
    for lora in loras:
        lora.apply_to()
    eager = outputs_and_grads(lambda x, s: block(x, scale=s), loras, x, scale)
    block.compile(backend="aot_eager")
    counters.clear()
    compiled = outputs_and_grads(lambda x, s: block(x, scale=s), loras, x, scale)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for got, want in zip(compiled[:2] + tuple(compiled[2]), eager[:2] + tuple(eager[2])):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    loras[1].remove()  # detaching under a compiled block recompiles and gives the new math
    without = outputs_and_grads(lambda x, s: block(x, scale=s), loras, x, scale)
    expected = outputs_and_grads(lambda x, s: reference(block, [loras[0], None], x, s), loras, x, scale)
    torch.testing.assert_close(without[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(without[1], expected[1], rtol=1e-5, atol=1e-6)
