"""Key mapping from diffusers' FluxTransformer2DModel layout to Black Forest Labs' layout."""

from __future__ import annotations

import re

from library.io.tensor_source import TensorRecipe

TOP_LEVEL_KEYS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}

DOUBLE_KEYS = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
DOUBLE_QKV_KEYS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_KEYS = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
SINGLE_LINEAR1_KEYS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def is_diffusers_flux(keys: list[str]) -> bool:
    return any(k.startswith("single_transformer_blocks.") for k in keys) and "x_embedder.weight" in keys


def diffusers_to_bfl_recipes(keys: list[str]) -> tuple[dict[str, TensorRecipe], list[str]]:
    """Recipes for every BFL key, and the diffusers keys nothing maps (reported as unexpected)."""
    recipes: dict[str, TensorRecipe] = {}
    for src, dst in TOP_LEVEL_KEYS.items():
        for suffix in ("weight", "bias"):
            recipes[f"{dst}.{suffix}"] = TensorRecipe((f"{src}.{suffix}",))
    for suffix in ("weight", "bias"):  # diffusers' AdaLayerNormContinuous orders (scale, shift); BFL (shift, scale)
        recipes[f"final_layer.adaLN_modulation.1.{suffix}"] = TensorRecipe(
            (f"norm_out.linear.{suffix}",), "swap_halves"
        )

    blocks = {(m.group(1), int(m.group(2))) for k in keys if (m := _BLOCK.match(k))}
    for kind, i in sorted(blocks):
        src, dst = f"{kind}.{i}.", ("double_blocks" if kind == "transformer_blocks" else "single_blocks") + f".{i}."
        linears = DOUBLE_KEYS if kind == "transformer_blocks" else SINGLE_KEYS
        norms = _DOUBLE_NORMS if kind == "transformer_blocks" else _SINGLE_NORMS
        fused = DOUBLE_QKV_KEYS if kind == "transformer_blocks" else {"linear1": SINGLE_LINEAR1_KEYS}
        for s, d in linears.items():
            for suffix in ("weight", "bias"):
                recipes[f"{dst}{d}.{suffix}"] = TensorRecipe((f"{src}{s}.{suffix}",))
        for s, d in norms.items():
            recipes[f"{dst}{d}"] = TensorRecipe((f"{src}{s}",))
        for d, parts in fused.items():
            for suffix in ("weight", "bias"):
                recipes[f"{dst}{d}.{suffix}"] = TensorRecipe(tuple(f"{src}{p}.{suffix}" for p in parts), "cat")

    key_set = set(keys)
    recipes = {k: r for k, r in recipes.items() if all(s in key_set for s in r.sources) or _partial(r, key_set)}
    used = {s for r in recipes.values() for s in r.sources}
    return recipes, sorted(key_set - used)


def _partial(recipe: TensorRecipe, key_set: set[str]) -> bool:
    """Keep a recipe whose sources exist only in part, so the missing part is reported by name."""
    return any(s in key_set for s in recipe.sources)
