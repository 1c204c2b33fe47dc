"""The shared training loop on a tiny FLUX.1 with a real LoRA, fed by an in-memory dataset of cached latents
and text outputs: loss falls, saves rotate and are atomic, and a resumed run ends with the same LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from library.models.flux.model import Flux
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params
from library.training.checkpoints import CheckpointNaming
from library.training.distributed import TrainedModules
from library.training.loop import LoopSettings, TrainingRun, fit, load_state
from library.training.lr_schedulers import build_lr_scheduler
from library.training.objective import ObjectiveConfig
from library.training.optimizer_step import StepKind, build_optimizer_step
from library.training.optimizers import build_optimizer
from library.training.targets import NetworkTarget
from networks import lora_flux


class CachedDataset:
    """Batches of fixed latents and text outputs; order shuffled per epoch from the seed, as the real one."""

    def __init__(self, n_batches: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(123)
        self.batches = [{"latents": torch.randn(2, 16, 4, 4, generator=g),
                         "text": {"l_pooled": torch.randn(2, 32, generator=g), "t5_out": torch.randn(2, 5, 32, generator=g),
                                  "txt_ids": torch.zeros(2, 5, 3), "t5_attn_mask": torch.ones(2, 5, dtype=torch.long)},
                         "loss_weights": torch.ones(2)} for _ in range(n_batches)]  # fmt: skip
        self.seed, self.epoch = seed, 0

    def set_current_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_current_step(self, step: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return (self.batches[i] for i in order.tolist())


class TinyFamily:
    block_swaps: list = []

    def __init__(self, flux: Flux):
        self.flux = flux

    def predict(self, inputs, dtype):
        from library.models.flux.sampling import pack_latents, prepare_img_ids, unpack_latents

        noisy, text = inputs.noisy_latents, inputs.text
        b, _, h, w = noisy.shape
        out = self.flux(img=pack_latents(noisy), img_ids=prepare_img_ids(b, h, w), txt=text["t5_out"],
                        txt_ids=text["txt_ids"], timesteps=inputs.timesteps, y=text["l_pooled"],
                        guidance=torch.full((b,), 1.0))  # fmt: skip
        return unpack_latents(out, h, w)

    def to_model_latents(self, latents):
        return latents

    def augment_text(self, text):
        return text

    def image_seq_len(self, latents):
        return latents.shape[-1] * latents.shape[-2] // 4


def _run(tmp_path: Path, settings: LoopSettings, lr: float = 1e-2, **names) -> TrainingRun:
    set_seed(0)
    params = tiny_flux_params(depth=1, depth_single_blocks=1, vec_in_dim=32, context_in_dim=32)
    flux = Flux(params)
    flux.load_state_dict(make_flux_state_dict(params, seed=0))
    flux.requires_grad_(False)
    network = lora_flux.create_network(1.0, 4, 4.0, None, [None, None], flux)
    network.apply_to(None, flux, apply_text_encoder=False)
    groups, _ = network.prepare_optimizer_params(None, None, lr)
    optimizer_step = build_optimizer_step(
        StepKind.PLAIN, [("network", groups)], lambda params: build_optimizer("AdamW", params, lr, []),
        lambda optimizer: build_lr_scheduler("constant", optimizer, num_training_steps=settings.max_train_steps),
        settings.max_grad_norm,
    )  # fmt: skip
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=settings.gradient_accumulation_steps)
    dataset = CachedDataset()
    prepared = optimizer_step.prepare(accelerator, TrainedModules(network, "cpu"))  # as the recipe prepares it
    return TrainingRun(
        accelerator=accelerator, family=TinyFamily(flux), target=NetworkTarget(network, False, None, prepared),
        dataset=dataset,
        loader=dataset, optimizer_step=optimizer_step,
        objective=ObjectiveConfig(timestep_sampling="uniform", model_prediction_type="raw"), settings=settings,
        naming=CheckpointNaming(tmp_path, names.get("output_name", "lora")), metadata={"ss_network_module": "networks.lora_flux"},
        weight_dtype=torch.float32,
    )  # fmt: skip


def test_loss_falls_and_saves_rotate(tmp_path):
    settings = LoopSettings(max_train_steps=60, num_epochs=100, save_every_n_steps=10, save_last_n_steps=20,
                            save_every_n_epochs=5, save_last_n_epochs=2)  # fmt: skip
    state = fit(_run(tmp_path, settings))
    assert state.global_step == 60 and state.epoch == 20
    first, last = sum(state.losses[:10]) / 10, sum(state.losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    names = sorted(p.name for p in tmp_path.iterdir())
    # saves of the last 20 steps at step 50 (30, 40, 50); the last 2 epoch saves (10, 15; 20 is the end file)
    assert names == ["lora-000010.safetensors", "lora-000015.safetensors", "lora-step00000030.safetensors", "lora-step00000040.safetensors",
                     "lora-step00000050.safetensors", "lora.safetensors"], names  # fmt: skip
    saved = load_file(str(tmp_path / "lora.safetensors"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in saved


def test_resume_gives_the_same_lora(tmp_path):
    full = LoopSettings(max_train_steps=12, num_epochs=12, gradient_accumulation_steps=2)
    fit(_run(tmp_path / "a", full))
    expected = load_file(str(tmp_path / "a" / "lora.safetensors"))

    half = LoopSettings(
        max_train_steps=12, num_epochs=12, gradient_accumulation_steps=2, save_every_n_steps=5, save_state=True
    )
    run = _run(tmp_path / "b", half)
    try:
        fit(run_with_kill(run, at_call=14))  # 14 micro-batches = step 7
    except KeyboardInterrupt:
        pass
    state_dir = tmp_path / "b" / "lora-step00000005-state"
    assert state_dir.is_dir() and not list((tmp_path / "b").glob(".*"))  # no half-written leftovers

    resumed = _run(tmp_path / "c", full)
    state = load_state(resumed, state_dir)
    assert (state.global_step, state.epoch) == (5, 3)
    fit(resumed, state)
    got = load_file(str(tmp_path / "c" / "lora.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def run_with_kill(run: TrainingRun, at_call: int) -> TrainingRun:
    """Make the loop stop abruptly (as a kill) at the ``at_call``-th scheduler call (one per micro-batch)."""
    scheduler = run.optimizer_step.schedulers[0]
    original = scheduler.step
    count = {"n": 0}

    def step(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= at_call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    scheduler.step = step
    return run


def test_kill_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    run = _run(tmp_path, LoopSettings(max_train_steps=2, num_epochs=2))
    fit(run)
    path = tmp_path / "lora.safetensors"
    before = path.read_bytes()

    import safetensors.torch

    def dies(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    monkeypatch.setattr("library.io.safetensors_file.save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        run.target.save(path, {})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def _with_validation(run: TrainingRun, every_n_steps: int | None = None) -> TrainingRun:
    from library.training.validation import Validation, ValidationSettings, validation_timesteps

    settings = ValidationSettings(seed=7, timesteps=validation_timesteps(run.objective), every_n_steps=every_n_steps)
    run.validation = Validation(settings, CachedDataset(n_batches=2, seed=99))
    return run


def test_validation_timesteps_as_upstream():
    from library.training.validation import validation_timesteps

    assert validation_timesteps(ObjectiveConfig()) == (0.2, 0.4, 0.6, 0.8)
    assert validation_timesteps(ObjectiveConfig(min_timestep=100, max_timestep=600)) == (0.2, 0.3, 0.4, 0.5)


def test_validation_is_logged_repeatable_and_leaves_training_unchanged(tmp_path):
    from library.training.validation import validation_loss

    settings = LoopSettings(max_train_steps=6, num_epochs=6)
    plain = fit(_run(tmp_path / "a", settings))
    run = _with_validation(_run(tmp_path / "b", settings), every_n_steps=2)
    validated = fit(run)
    # every 2 steps (2, 4, 6) and after each of the 2 epochs the 6 steps span
    assert [step for step, _ in validated.validation_losses] == [2, 3, 4, 6, 6]
    assert validated.losses == plain.losses  # the training's random streams are untouched
    first, second = validation_loss(run, run.validation), validation_loss(run, run.validation)
    assert first == second and first > 0  # fixed timesteps and noise: the same weights give the same loss
    trained = load_file(str(tmp_path / "b" / "lora.safetensors"))
    for key, value in load_file(str(tmp_path / "a" / "lora.safetensors")).items():
        torch.testing.assert_close(trained[key], value, rtol=0, atol=0)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_file(tmp_path):
    from library.errors import UserError

    run = _run(tmp_path, LoopSettings(max_train_steps=6, num_epochs=6, save_every_n_steps=2))
    batches = run.dataset.batches
    original = run.dataset.__iter__

    def poisoned():  # from step 4 on the text outputs are NaN (as a broken text encoder gives)
        for batch in original():
            yield {**batch, "text": {k: v * float("nan") for k, v in batch["text"].items()}} if poisoned.calls >= 3 else batch
            poisoned.calls += 1

    poisoned.calls = 0
    run.loader = type("Loader", (), {"__iter__": lambda self: poisoned(), "__len__": lambda self: len(batches)})()
    with pytest.raises(UserError, match=r"the loss became nan at step 4.*lora-step00000002\.safetensors"):
        fit(run)
    saved = load_file(str(tmp_path / "lora-step00000002.safetensors"))
    assert all(bool(torch.isfinite(v).all()) for v in saved.values())
    assert not (tmp_path / "lora.safetensors").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    from library.errors import UserError

    run = _run(tmp_path, LoopSettings(max_train_steps=1, num_epochs=1))
    fit(run)
    before = (tmp_path / "lora.safetensors").read_bytes()
    with torch.no_grad():
        next(p for n, p in run.target.network.named_parameters() if "lora_up" in n).fill_(float("inf"))
    with pytest.raises(UserError, match="NaN or infinite"):
        run.target.save(tmp_path / "lora.safetensors", {})
    assert (tmp_path / "lora.safetensors").read_bytes() == before


def test_differential_output_preservation_targets_the_base_prediction(tmp_path):
    from library.training.batch_loss import batch_loss

    run = _run(tmp_path, LoopSettings(max_train_steps=1, num_epochs=1))
    batch = dict(run.dataset.batches[0])
    batch["diff_output_preservation"] = torch.tensor([True, False])
    with torch.no_grad():  # a LoRA that changes the output
        for name, param in run.target.network.named_parameters():
            if "lora_up" in name:
                param.normal_(std=0.5)

    def losses(flags):
        torch.manual_seed(3)
        return batch_loss(run, {**batch, "diff_output_preservation": flags, "loss_weights": torch.tensor([1.0, 0.0])})

    preserved, plain = losses(torch.tensor([True, False])), losses(torch.tensor([False, False]))
    assert 0 < preserved < plain  # the first sample is compared with the base model's output, not the data
    with torch.no_grad():
        for name, param in run.target.network.named_parameters():
            if "lora_up" in name:
                param.zero_()
    assert losses(torch.tensor([True, False])) < 1e-10  # a LoRA that changes nothing preserves the output
    assert run.target.network.unet_loras[0].enabled  # the adapter is on again afterwards


def test_rotation_removes_fine_tuned_text_encoders_beside_old_models(tmp_path):
    naming = CheckpointNaming(tmp_path, "ft")
    for step in (1, 2):
        for suffix in ("", "_clip_l", "_clip_g"):
            (tmp_path / f"ft-step{step:08d}{suffix}.safetensors").write_bytes(b"x")
    removed = naming.remove_old("step", 2, 1)
    assert sorted(p.name for p in removed) == ["ft-step00000001.safetensors", "ft-step00000001_clip_g.safetensors",
                                               "ft-step00000001_clip_l.safetensors"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft-step00000002.safetensors",
                                                          "ft-step00000002_clip_g.safetensors",
                                                          "ft-step00000002_clip_l.safetensors"]  # fmt: skip
