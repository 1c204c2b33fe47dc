"""The T5 v1.1 encoder (T5-XXL for FLUX.1 and SD3) from users' single files (fp16, bf16, fp32 or fp8)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import T5Config, T5EncoderModel

from library.errors import UserError
from library.io.safetensors_file import SafetensorsHeader, iter_tensors, read_header
from library.models.checkpoint_kind import describe_checkpoint
from library.models.state_loading import assign_state, check_state_keys

logger = logging.getLogger(__name__)

Q_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def t5_config_from_header(header: SafetensorsHeader, prefix: str = "") -> T5Config:
    """The config of the T5 encoder whose keys start with ``prefix``."""
    buckets, heads = header.shape(prefix + BIAS_KEY)
    inner, d_model = header.shape(prefix + Q_KEY)
    gated = f"{prefix}encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in header
    wi = "wi_0" if gated else "wi"
    block = re.compile(rf"^{re.escape(prefix)}encoder\.block\.(\d+)\.")
    layers = {int(m.group(1)) for k in header.keys() if (m := block.match(k))}
    embed = f"{prefix}shared.weight" if f"{prefix}shared.weight" in header else f"{prefix}encoder.embed_tokens.weight"
    return T5Config(
        vocab_size=header.shape(embed)[0], d_model=d_model, d_kv=inner // heads, num_heads=heads,
        num_layers=max(layers) + 1,
        d_ff=header.shape(f"{prefix}encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0],
        relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip


def load_t5_encoder(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    option: str = "--t5xxl",
    prefix: str = "",
) -> T5EncoderModel:
    """Load a T5 encoder; ``wo`` stays in fp32 for fp16 (T5's overflow guard, as transformers does).

    ``prefix``: the encoder's keys in the file (``text_encoders.t5xxl.transformer.`` in SD3 checkpoints); keys
    outside it are ignored."""
    header = read_header(path, option)
    what = f"{option} {path}" + (f" under {prefix!r}" if prefix else "")
    if prefix + Q_KEY not in header or prefix + BIAS_KEY not in header:
        raise UserError(f"{what}: expected a T5-XXL text encoder, found {describe_checkpoint(header)}")
    names = {k: k[len(prefix) :] for k in header.keys() if k.startswith(prefix)}
    if any(name.endswith(".scale_weight") or name == "scaled_fp8" for name in names.values()):
        raise UserError(
            f"{what}: 'scaled' fp8 T5 files are not supported; use t5xxl_fp16 or t5xxl_fp8_e4m3fn (not scaled)"
        )
    config = t5_config_from_header(header, prefix)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {name: header.shape(k) for k, name in names.items()}
    embed = "shared.weight" if "shared.weight" in found else "encoder.embed_tokens.weight"
    found.setdefault("shared.weight", found[embed])
    found.setdefault("encoder.embed_tokens.weight", found[embed])
    check_state_keys(found, expected, what, "T5 encoder")

    def dtype_for(key: str) -> torch.dtype:
        return torch.float32 if dtype == torch.float16 and ".DenseReluDense.wo." in key else dtype

    state = {names[k]: t.to(dtype_for(k)) for k, t in iter_tensors(header.path, list(names), device)}
    state.setdefault("shared.weight", state[embed])
    state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    assign_state(model, state)
    logger.info("T5: %d layers, width %d, %s", config.num_layers, config.d_model, dtype)
    return model.eval().requires_grad_(False)


def encode_t5(model: T5EncoderModel, input_ids: Tensor, attention_mask: Tensor, apply_attn_mask: bool) -> Tensor:
    """Last hidden states [B, L, d_model]; with ``apply_attn_mask`` padding is masked inside the encoder."""
    mask = attention_mask.to(input_ids.device) if apply_attn_mask else None
    return model(input_ids=input_ids, attention_mask=mask).last_hidden_state


@torch.no_grad()
def make_tiny_t5_state_dict(
    d_model: int = 128, layers: int = 2, d_ff: int = 256, num_heads: int = 2, seed: int = 0
) -> dict[str, Tensor]:
    """A random T5 v1.1 encoder in the single-file layout, real vocabulary (32128), head dim 64."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=d_model, d_kv=64, num_heads=num_heads, num_layers=layers, d_ff=d_ff,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
    model = T5EncoderModel(config)
    for name, param in model.named_parameters():
        if "layer_norm" in name:
            param.uniform_(0.5, 1.5)  # non-trivial norms so a wrong or skipped norm changes outputs
    return {k: v.clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
