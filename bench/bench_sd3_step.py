"""SD3 MMDiT step time: our MMDiT against diffusers' SD3Transformer2DModel loaded from the same tiny single file
(through diffusers' own converter), same inputs, forward + backward with every weight trainable. Steps alternate
between the two models after warm-up; medians are printed with the ratio ours / diffusers.

    .venv/bin/python bench/bench_sd3_step.py [--variant medium] [--depth 4] [--latent 32] [--steps 10]
    .venv/bin/python bench/bench_sd3_step.py --device cuda --dtype bf16 --depth 12 --latent 128
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from library.dtypes import parse_dtype  # noqa: E402
from library.models.sd3.loading import load_sd3_mmdit  # noqa: E402
from library.models.sd3.model import SD3Params  # noqa: E402
from library.models.sd3.tiny import make_sd3_state_dict, tiny_sd3_params  # noqa: E402


def _diffusers_model(path: Path, params: SD3Params, dtype: torch.dtype, device: str) -> SD3Transformer2DModel:
    converted = convert_sd3_transformer_checkpoint_to_diffusers(load_file(str(path)))
    with torch.device("meta"):
        model = SD3Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=params.depth, attention_head_dim=64,
            num_attention_heads=params.depth, caption_projection_dim=params.hidden_size,
            joint_attention_dim=params.context_in_dim, pooled_projection_dim=params.adm_in_dim,
            pos_embed_max_size=params.pos_embed_max_size, qk_norm="rms_norm" if params.qk_norm else None,
            dual_attention_layers=params.x_block_self_attn_layers,
        )  # fmt: skip
    model.load_state_dict(converted, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="medium", choices=("medium", "5-medium", "5-large"))
    parser.add_argument("--depth", type=int, default=4, help="joint blocks (hidden 64 * depth)")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--context", type=int, default=77 + 32, help="text tokens (CLIP 77 + T5)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    args = parser.parse_args()
    dtype, device = parse_dtype(args.dtype, "--dtype"), args.device
    torch.manual_seed(0)
    params = tiny_sd3_params(args.variant, depth=args.depth, pos_embed_max_size=max(32, args.latent // 2))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sd3-bench.safetensors"
        save_file(make_sd3_state_dict(params), str(path))
        ours = load_sd3_mmdit(path, dtype=dtype, device=device).train().requires_grad_(True)
        reference = _diffusers_model(path, params, dtype, device).train().requires_grad_(True)

    b, hidden = args.batch, params.hidden_size
    x = torch.randn(b, 16, args.latent, args.latent, device=device, dtype=dtype)
    y = torch.randn(b, params.adm_in_dim, device=device, dtype=dtype)
    context = torch.randn(b, args.context, params.context_in_dim, device=device, dtype=dtype)
    timesteps = torch.rand(b, device=device) * 1000

    def ours_step() -> torch.Tensor:
        out = ours(x, timesteps, y, context)
        out.float().square().mean().backward()
        return out

    def reference_step() -> torch.Tensor:
        out = reference(x, context, y, timesteps, return_dict=False)[0]
        out.float().square().mean().backward()
        return out

    with torch.no_grad():
        a, r = ours(x, timesteps, y, context).float(), reference(x, context, y, timesteps, return_dict=False)[0].float()
    mismatch = ((a - r).abs().max() / r.abs().max()).item()

    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    for step in range(args.warmup + args.steps):
        for name, fn, model in (("ours", ours_step, ours), ("diffusers", reference_step, reference)):
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    o, d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"torch {torch.__version__}, {device} {args.dtype}, threads {torch.get_num_threads()}; {params.display_name} "
        f"layout, depth {params.depth} (hidden {hidden}), batch {b}, latents {args.latent}x{args.latent} "
        f"({(args.latent // 2) ** 2} tokens), context {args.context}; {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"outputs agree to {mismatch:.1e} (max |diff| / max |output|)")
    print(f"ours      forward+backward median: {o * 1000:8.1f} ms")
    print(f"diffusers forward+backward median: {d * 1000:8.1f} ms")
    print(f"ratio (ours / diffusers):          {o / d:8.3f}")


if __name__ == "__main__":
    main()
