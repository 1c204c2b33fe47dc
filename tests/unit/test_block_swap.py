from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from library.errors import UserError
from library.memory.block_swap import BlockSwap, check_num_swap, max_swappable, move_except_swapped, split_flux_swap
from library.memory.checkpointing import disable_block_checkpointing, enable_block_checkpointing
from library.memory.fp8 import cast_linear_weights_to_fp8, disable_fp8_linear, enable_fp8_linear
from library.memory.movers import SimulatedMover
from networks.lora import LoRAModule

N = 6


class Block(nn.Module):
    """Weights that move (fc1, fc2), and tensors that stay: a bias, a norm scale, a buffer."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.register_buffer("shift", 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor, *, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.fc1(x * self.scale + self.shift) + vec[:, None, : self.fc1.out_features])
        out = x + self.fc2(h)
        return out, out.mean(dim=1)


class Stack(nn.Module):
    def __init__(self, hidden: tuple[int, ...] = (32,) * N):
        super().__init__()
        self.vec_in = nn.Linear(4, max(hidden))
        self.blocks = nn.ModuleList(Block(hidden=h) for h in hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        vec = self.vec_in(y)
        pooled = []
        for block in self.blocks:
            x, p = block(x, vec=vec)
            pooled.append(p)
        return x + torch.stack(pooled).sum(0)[:, None]


def make(hidden: tuple[int, ...] = (32,) * N, full: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = Stack(hidden)
    model.requires_grad_(full)
    loras = [] if full else [LoRAModule(f"lora_{i}_{n}", getattr(b, n), lora_dim=2, alpha=2.0)
                             for i, b in enumerate(model.blocks) for n in ("fc1", "fc2")]  # fmt: skip
    with torch.no_grad():
        for lora in loras:
            lora.lora_up.weight.normal_(0, 0.1)
            lora.apply_to()
    return model, loras


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 16, generator=generator), torch.randn(2, 4, generator=generator)


def trained(model, loras):
    return [p for lora in loras for p in lora.parameters()] if loras else list(model.parameters())


def step(model, loras, seed: int = 1):
    """One forward + backward; returns the output and the trained tensors' gradients (then cleared)."""
    x, y = inputs(seed)
    out = model(x, y)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in trained(model, loras)]
    for p in trained(model, loras):
        p.grad = None
    return out.detach(), grads


class Residency:
    """Checks, at every Linear call of a block (forward, backward recompute), that the block's weights are on the
    simulated device, and records how many blocks are resident then."""

    def __init__(self, model: Stack, mover: SimulatedMover):
        self.model, self.mover, self.max_resident, self.calls = model, mover, 0, 0
        for index, block in enumerate(model.blocks):
            for layer in (block.fc1, block.fc2):
                layer.register_forward_pre_hook(lambda module, args, i=index: self.check(i))

    def placement(self) -> list[bool]:
        return [all(self.mover.is_device(p) for p in (b.fc1.weight, b.fc2.weight)) for b in self.model.blocks]

    def check(self, index: int) -> None:
        placement = self.placement()
        assert placement[index], f"block {index} runs with weights off the device"
        self.max_resident = max(self.max_resident, sum(placement))
        self.calls += 1


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("checkpointing", ["none", "plain", "cpu_offload"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_training_keeps_blocks_resident_bounded_and_gradients_exact(k, checkpointing):
    reference, ref_loras = make()
    model, loras = make()
    if checkpointing != "none":
        enable_block_checkpointing(model.blocks, cpu_offload=checkpointing == "cpu_offload")
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, k, "cpu", mover=mover)
    swap.attach()
    residency = Residency(model, mover)
    initial = residency.placement()
    assert initial == [True] * (N - k) + [False] * k
    for seed in (1, 2):
        swap.prepare_for_training()
        out, grads = step(model, loras, seed)
        want_out, want_grads = step(reference, ref_loras, seed)
        assert torch.equal(out, want_out)
        assert_same(grads, want_grads)
        assert residency.placement() == initial
    assert residency.max_resident == N - k
    runs_per_step = 2 * N * (2 if checkpointing != "none" else 1)  # two Linears per block, recomputed in backward
    assert residency.calls == 2 * runs_per_step
    assert all(mover.is_device(b.fc1.bias) and mover.is_device(b.scale) for b in model.blocks) is False  # CPU
    assert all(not mover.is_device(p) for lora in loras for p in lora.parameters())  # LoRA never moves


def sgd_step(p: nn.Parameter) -> None:
    p.data.add_(p.grad, alpha=-1e-3)
    p.grad = None


def fused_sgd(model: nn.Module) -> None:
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(sgd_step)


def test_full_fine_tune_with_a_fused_step_updates_swapped_weights_exactly():
    """Trained block weights are swapped too: their gradients arrive while they are resident, a step fused into
    backward updates them on the device, and the updated values travel with the swaps."""

    reference, _ = make(full=True)
    model, _ = make(full=True)
    fused_sgd(reference)
    fused_sgd(model)
    enable_block_checkpointing(model.blocks)
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 3, "cpu", mover=mover)
    swap.attach()
    residency = Residency(model, mover)
    for seed in (1, 2, 3):
        x, y = inputs(seed)
        reference(x, y).square().mean().backward()
        model(x, y).square().mean().backward()
    assert residency.max_resident == N - 3
    assert swap.offloaded_trained_weights() == [p for b in model.blocks[-3:] for p in (b.fc1.weight, b.fc2.weight)]
    swap.detach()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(got, want) and got.isfinite().all(), name
    assert not torch.equal(model.blocks[-1].fc1.weight, make(full=True)[0].blocks[-1].fc1.weight)  # it trained


def test_gradients_of_plain_swapped_weights_without_fused_step():
    reference, _ = make(full=True)
    model, _ = make(full=True)
    swap = BlockSwap(model.blocks, 2, "cpu", mover=SimulatedMover())
    swap.attach()
    out, grads = step(model, [])
    want_out, want_grads = step(reference, [])
    assert torch.equal(out, want_out)
    assert_same(grads, want_grads)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_forward_only_calls_keep_placement_and_move_only_what_they_must(k):
    reference, ref_loras = make()
    model, loras = make()
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, k, "cpu", mover=mover)
    swap.attach()
    residency = Residency(model, mover)
    initial = residency.placement()
    with swap.forward_only(), torch.no_grad():
        for seed in (1, 2, 3):
            before = mover.submitted
            assert torch.equal(model(*inputs(seed)), reference(*inputs(seed)))
            assert residency.placement() == initial
            assert mover.submitted - before == (2 * k if 2 * k <= N else N)  # swaps per call, no re-placement
    assert residency.max_resident == N - k


def test_sampling_between_training_steps_and_an_interrupted_pass():
    reference, ref_loras = make()
    model, loras = make()
    enable_block_checkpointing(model.blocks)
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 2, "cpu", mover=mover)
    swap.attach()
    residency = Residency(model, mover)
    assert_same(step(model, loras)[1], step(reference, ref_loras)[1])
    with swap.forward_only(), torch.no_grad():
        assert torch.equal(model(*inputs(3)), reference(*inputs(3)))
    model(*inputs(4))  # a training forward whose backward never comes
    with torch.no_grad():  # no forward_only: a pass without grad follows the forward-only schedule by itself
        assert torch.equal(model(*inputs(5)), reference(*inputs(5)))
    model(*inputs(6))
    swap.prepare_for_training()
    assert_same(step(model, loras, 7)[1], step(reference, ref_loras, 7)[1])
    assert residency.placement() == [True] * (N - 2) + [False] * 2
    assert residency.max_resident == N - 2


def test_two_forwards_then_one_backward_without_checkpointing():
    """Autograd keeps views of the weights' device storage (``F.linear`` saves ``weight.t()``), so each block's
    backward must find its weights in the storage it ran forward in, whatever the order of passes."""
    reference, ref_loras = make()
    model, loras = make()
    swap = BlockSwap(model.blocks, 2, "cpu", mover=SimulatedMover())
    swap.attach()

    def two_passes(m, trained_loras):
        loss = m(*inputs(1)).square().mean() + m(*inputs(2)).square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in trained(m, trained_loras)]
        for p in trained(m, trained_loras):
            p.grad = None
        return grads

    assert_same(two_passes(model, loras), two_passes(reference, ref_loras))
    assert_same(step(model, loras, 3)[1], step(reference, ref_loras, 3)[1])


def test_blocks_of_different_shapes_swap_through_fresh_storage():
    hidden = (32, 32, 24, 32, 48, 32)
    reference, ref_loras = make(hidden)
    model, loras = make(hidden)
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 3, "cpu", mover=mover)
    swap.attach()
    residency = Residency(model, mover)
    for seed in (1, 2):
        out, grads = step(model, loras, seed)
        want_out, want_grads = step(reference, ref_loras, seed)
        assert torch.equal(out, want_out)
        assert_same(grads, want_grads)
    with swap.forward_only(), torch.no_grad():
        assert torch.equal(model(*inputs(3)), reference(*inputs(3)))
    assert residency.max_resident == N - 3


def test_attach_then_detach_leaves_the_blocks_as_they_were():
    model, loras = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    storages = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters() if not n.endswith("weight")}
    dicts = {n: set(m.__dict__) for n, m in model.named_modules()}
    params = {n: id(p) for n, p in model.named_parameters()}
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 3, "cpu", mover=mover)
    swap.attach()
    step(model, loras)
    swap.detach()
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == dicts
    assert not any(mover.is_device(p) for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(storages[n] == p.untyped_storage().data_ptr() for n, p in model.named_parameters() if n in storages)


@pytest.mark.parametrize("order", ["swap_first", "swap_last"])
def test_swap_stacks_with_fp8_lora_and_checkpointing_in_any_order(order):
    reference, ref_loras = make()
    model, loras = make()
    for m in (reference, model):
        cast_linear_weights_to_fp8(m.blocks)
        enable_fp8_linear(m.blocks)
    swap = BlockSwap(model.blocks, 3, "cpu", mover=SimulatedMover())
    if order == "swap_first":
        swap.attach()
    enable_block_checkpointing(model.blocks, cpu_offload=True)
    if order == "swap_last":
        swap.attach()
    assert_same(step(model, loras)[1], step(reference, ref_loras)[1])
    for lora in loras:  # LoRA out and back while swapped
        lora.remove()
    assert torch.equal(model(*inputs(2)), _without(reference, ref_loras, inputs(2)))
    for lora in loras:
        lora.apply_to()
    disable_fp8_linear(model.blocks) if order == "swap_first" else None
    enable_fp8_linear(model.blocks)
    disable_block_checkpointing(model.blocks)
    assert_same(step(model, loras, 3)[1], step(reference, ref_loras, 3)[1])
    swap.detach()
    for lora in loras:
        lora.remove()
    disable_fp8_linear(model.blocks)
    assert all("forward" not in m.__dict__ for m in model.modules())


def _without(model, loras, batch):
    for lora in loras:
        lora.remove()
    out = model(*batch)
    for lora in loras:
        lora.apply_to()
    return out


def test_torch_compile_on_top_of_swapped_blocks():
    from torch._dynamo.utils import counters

    reference, ref_loras = make()
    model, loras = make()
    enable_block_checkpointing(model.blocks)
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 2, "cpu", mover=mover)
    swap.attach()
    torch._dynamo.reset()
    counters.clear()
    for block in model.blocks:
        block.compile(backend="aot_eager")
    for seed in (1, 2):
        out, grads = step(model, loras, seed)
        want_out, want_grads = step(reference, ref_loras, seed)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert [mover.is_device(b.fc1.weight) for b in model.blocks] == [True] * (N - 2) + [False] * 2
    assert 0 < counters["stats"]["unique_graphs"] <= 2  # one graph for every block (and one for block 0's input)


def test_move_except_swapped_leaves_offloaded_weights_in_host_memory():
    model, _ = make()
    mover = SimulatedMover()
    swap = BlockSwap(model.blocks, 2, "cpu", mover=mover)
    swap.attach()
    move_except_swapped(model, "cpu", [swap])
    assert [mover.is_device(b.fc1.weight) for b in model.blocks] == [True] * (N - 2) + [False] * 2
    assert swap.weights() == {id(p) for b in model.blocks for p in (b.fc1.weight, b.fc2.weight)}


def test_limits_and_flux_split():
    assert max_swappable(19) == 17 and max_swappable(38) == 36 and max_swappable(1) == 0
    assert split_flux_swap(0, 19, 38) == (0, 0)
    assert split_flux_swap(1, 19, 38) == (0, 2)
    assert split_flux_swap(8, 19, 38) == (4, 8)
    assert split_flux_swap(35, 19, 38) == (17, 36)
    with pytest.raises(UserError, match=r"--blocks_to_swap 36: .* at most 35 is possible"):
        split_flux_swap(36, 19, 38)
    with pytest.raises(UserError, match="give 0 or more"):
        split_flux_swap(-1, 19, 38)
    with pytest.raises(UserError, match=r"--blocks_to_swap 23: the model has 24 joint blocks, of which 0 to 22"):
        check_num_swap(23, 24, "joint blocks")
    with pytest.raises(UserError, match="--blocks_to_swap 5"):
        BlockSwap(make()[0].blocks, 5, "cpu")
    swap = BlockSwap(make()[0].blocks, 0, "cpu")
    swap.attach()
    swap.detach()


def test_flux_double_and_single_swappers_match_the_plain_model():
    from library.models.flux.model import Flux
    from library.models.flux.sampling import prepare_img_ids
    from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
    from networks import lora_flux

    params = tiny_flux_params(depth=4, depth_single_blocks=6, vec_in_dim=32, context_in_dim=32)
    models = []
    for _ in range(2):
        model = Flux(params)
        model.load_state_dict(make_flux_state_dict(params, seed=0))
        model.requires_grad_(False)
        torch.manual_seed(3)
        network = lora_flux.create_network(1.0, 4, 4.0, None, [None, None], model)
        network.apply_to(None, model, apply_text_encoder=False)
        with torch.no_grad():
            for p in network.parameters():
                p.normal_(0, 0.05)
        models.append((model, network))
    (reference, ref_net), (model, network) = models
    k_double, k_single = split_flux_swap(3, 4, 6)
    assert (k_double, k_single) == (1, 4)
    enable_block_checkpointing([*model.double_blocks, *model.single_blocks])
    swaps = [BlockSwap(model.double_blocks, k_double, "cpu", mover=SimulatedMover(), name="double blocks"),
             BlockSwap(model.single_blocks, k_single, "cpu", mover=SimulatedMover(), name="single blocks")]  # fmt: skip
    for swap in swaps:
        swap.attach()
    batch = dict(img=torch.randn(1, 4, 64), img_ids=prepare_img_ids(1, 4, 4), txt=torch.randn(1, 3, 32),
                 txt_ids=torch.zeros(1, 3, 3), timesteps=torch.tensor([0.5]), y=torch.randn(1, 32),
                 guidance=torch.tensor([3.5]))  # fmt: skip

    def grads(m, net):
        for swap in swaps if m is model else ():
            swap.prepare_for_training()
        out = m(**batch)
        out.square().mean().backward()
        result = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        return out.detach(), result

    for _ in range(2):
        out, got = grads(model, network)
        want_out, want = grads(reference, ref_net)
        assert torch.equal(out, want_out)
        assert_same(got, want)
    with torch.no_grad():
        for swap in swaps:
            swap.prepare_for_training()
        with swaps[0].forward_only(), swaps[1].forward_only():
            assert torch.equal(model(**batch), reference(**batch))


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing", [False, True])
def test_cuda_swap_equals_no_swap_with_streams(checkpointing):
    device = torch.device("cuda")
    reference, ref_loras = make()
    model, loras = make()
    reference.to(device)
    for lora in ref_loras + loras:
        lora.to(device)
    if checkpointing:
        enable_block_checkpointing(model.blocks, cpu_offload=True)
    swap = BlockSwap(model.blocks, 3, device)
    swap.attach()
    move_except_swapped(model, device, [swap])
    assert [b.fc1.weight.device.type for b in model.blocks] == ["cuda"] * 3 + ["cpu"] * 3
    for seed in (1, 2, 3):
        x, y = (t.to(device) for t in inputs(seed))
        swap.prepare_for_training()
        out = model(x, y)
        out.square().mean().backward()
        want = reference(x, y)
        want.square().mean().backward()
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for p, q in zip(trained(model, loras), trained(reference, ref_loras)):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
            p.grad = q.grad = None
    with swap.forward_only(), torch.no_grad():
        for seed in (4, 5):
            x, y = (t.to(device) for t in inputs(seed))
            torch.testing.assert_close(model(x, y), reference(x, y), rtol=1e-5, atol=1e-6)
    swap.synchronize()
    assert [b.fc1.weight.device.type for b in model.blocks] == ["cuda"] * 3 + ["cpu"] * 3
    swap.detach()


@pytest.mark.gpu
def test_cuda_full_fine_tune_weights_come_back_updated():
    device = torch.device("cuda")
    reference, _ = make(full=True)
    model, _ = make(full=True)
    fused_sgd(reference)
    fused_sgd(model)
    reference.to(device)
    swap = BlockSwap(model.blocks, 4, device)
    swap.attach()
    move_except_swapped(model, device, [swap])
    for seed in (1, 2, 3):
        x, y = (t.to(device) for t in inputs(seed))
        model(x, y).square().mean().backward()
        reference(x, y).square().mean().backward()
    swap.detach()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got.to(device), want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.blocks[-1].fc1.weight.to(device), make(full=True)[0].blocks[-1].fc1.weight.to(device))
