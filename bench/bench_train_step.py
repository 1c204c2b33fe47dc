"""Training step time and overhead: our full LoRA training step (objective, LoRA-wrapped FLUX.1 forward and
backward, optimizer and scheduler through accelerate) against the bare transformer forward+backward on the same
batch, measured in the same run. Small config: FLUX width 512, 2+4 blocks, 32x32 latents, T5 length 64.

    .venv/bin/python bench/bench_train_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from accelerate import Accelerator  # noqa: E402

from library.models.flux.model import Flux  # noqa: E402
from library.models.flux.sampling import pack_latents, prepare_img_ids  # noqa: E402
from library.models.flux.tiny import make_flux_state_dict, tiny_flux_params  # noqa: E402
from library.training.checkpoints import CheckpointNaming  # noqa: E402
from library.training.loop import LoopSettings, TrainingRun, batch_loss  # noqa: E402
from library.training.lr_schedulers import build_lr_scheduler  # noqa: E402
from library.training.objective import ObjectiveConfig  # noqa: E402
from library.training.optimizers import build_optimizer  # noqa: E402
from library.training.targets import NetworkTarget  # noqa: E402
from networks import lora_flux  # noqa: E402


class _Family:
    def __init__(self, flux: Flux):
        self.flux = flux

    def predict(self, noisy, t, text, dtype):
        from library.models.flux.sampling import unpack_latents

        b, _, h, w = noisy.shape
        out = self.flux(img=pack_latents(noisy), img_ids=prepare_img_ids(b, h, w), txt=text["t5_out"],
                        txt_ids=text["txt_ids"], timesteps=t, y=text["l_pooled"], guidance=torch.full((b,), 1.0))  # fmt: skip
        return unpack_latents(out, h, w)

    def image_seq_len(self, latents):
        return latents.shape[-1] * latents.shape[-2] // 4


def _timed(fn, steps: int) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    params = tiny_flux_params(hidden_size=512, depth=2, depth_single_blocks=4, vec_in_dim=128, context_in_dim=256)
    flux = Flux(params)
    flux.load_state_dict(make_flux_state_dict(params))
    flux.requires_grad_(False)
    batch = {"latents": torch.randn(2, 16, 32, 32), "loss_weights": torch.ones(2),
             "text": {"l_pooled": torch.randn(2, 128), "t5_out": torch.randn(2, 64, 256), "txt_ids": torch.zeros(2, 64, 3),
                      "t5_attn_mask": torch.ones(2, 64, dtype=torch.long)}}  # fmt: skip
    network = lora_flux.create_network(1.0, 16, 16.0, None, [None, None], flux)
    network.apply_to(None, flux, apply_text_encoder=False)
    groups, _ = network.prepare_optimizer_params(None, None, 1e-4)
    _, optimizer = build_optimizer("AdamW", groups, 1e-4, [])
    accelerator = Accelerator(cpu=True)
    scheduler = build_lr_scheduler("constant", optimizer, num_training_steps=1000)
    prepared, optimizer, scheduler = accelerator.prepare(network, optimizer, scheduler)
    run = TrainingRun(accelerator, _Family(flux), NetworkTarget(network, False, None, prepared), None, [], optimizer,
                      scheduler, ObjectiveConfig(timestep_sampling="shift", model_prediction_type="raw"),
                      LoopSettings(max_train_steps=1000, num_epochs=1), CheckpointNaming(Path("/tmp"), "bench"), {},
                      torch.float32)  # fmt: skip

    def full_step():
        loss = batch_loss(run, batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    network.set_enabled(False)  # bare: the LoRA modules pass straight through to the base layers
    bare_inputs = dict(img=pack_latents(batch["latents"]), img_ids=prepare_img_ids(2, 32, 32), txt=batch["text"]["t5_out"],
                       txt_ids=batch["text"]["txt_ids"], y=batch["text"]["l_pooled"], timesteps=torch.full((2,), 0.5),
                       guidance=torch.full((2,), 1.0))  # fmt: skip
    flux.img_in.weight.requires_grad_(True)  # so backward runs through every block, as with LoRA

    def bare_step():
        flux(**bare_inputs).square().mean().backward()

    bare = _timed(bare_step, args.steps)
    flux.img_in.weight.requires_grad_(False)
    network.set_enabled(True)
    full = _timed(full_step, args.steps)
    b, f = statistics.median(bare), statistics.median(full)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps each, medians")
    print(f"bare transformer forward+backward: {b * 1000:8.1f} ms")
    print(f"full LoRA training step:           {f * 1000:8.1f} ms")
    print(f"overhead ratio (full / bare):      {f / b:8.3f}")


if __name__ == "__main__":
    main()
