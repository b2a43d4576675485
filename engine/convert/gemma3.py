"""config.json of a Gemma 3 text checkpoint (Gemma3ForCausalLM) as llama.cpp's
converter (Gemma3Model) reads it, in both config styles: transformers 4's rope_theta,
rope_local_base_freq, rope_scaling and sliding_window_pattern, and transformers 5's
rope_parameters {"full_attention": ..., "sliding_attention": ...} and layer_types.

What llama.cpp's gemma3 graph cannot express is refused rather than converted into a
file that runs differently (engine/arch/gemma3.py says why each is fixed there): a layer
pattern other than set_swa_pattern(6), a local RoPE base other than 10000 or scaled
local RoPE, a query_pre_attn_scalar that is not the scale llama.cpp uses, logit
soft-capping, bidirectional attention."""
from __future__ import annotations

import math
from pathlib import Path

from engine.errors import ConvertError

LOCAL, GLOBAL = "sliding_attention", "full_attention"
HF_ACTIVATION = "gelu_pytorch_tanh"  # transformers' name of GELU's tanh approximation


def gemma3_hparams(cfg: dict, cfg_path: Path, hp: dict) -> None:
    """Adds n_swa and Gemma's RoPE (the global layers' base and scaling) to hp."""
    arch = hp["arch"]
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or HF_ACTIVATION
    if act != HF_ACTIVATION:
        raise ConvertError(f"{cfg_path}: hidden_activation {act!r} is not supported for "
                           f"gemma3; supported: {HF_ACTIVATION}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise ConvertError(f"{cfg_path}: {key} is set; kiln's gemma3 does not soft-cap")
    if cfg.get("use_bidirectional_attention"):
        raise ConvertError(f"{cfg_path}: use_bidirectional_attention is true; gemma3 as "
                           f"llama.cpp runs it is causal")
    try:
        n_swa = int(cfg.get("sliding_window") or 0)
        pattern = int(cfg.get("sliding_window_pattern") or 6)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: invalid sliding window ({e})") from None
    if pattern == 1:  # llama.cpp's converter writes no window then
        n_swa = 0
    hp["n_swa"] = max(n_swa, 0)
    types = cfg.get("layer_types")
    if types is None:  # transformers' derivation from the old pattern
        types = [LOCAL if (i + 1) % pattern else GLOBAL for i in range(hp["n_layer"])]
    want = [LOCAL if s else GLOBAL for s in arch.swa_layers(hp["n_layer"], hp["n_swa"])]
    if hp["n_swa"] and list(types) != want:  # without a window every layer is global
        raise ConvertError(f"{cfg_path}: layer_types {types} are not llama.cpp's gemma3 "
                           f"pattern (every 6th layer global, the others sliding)")

    rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    full = rp.get(GLOBAL) if isinstance(rp.get(GLOBAL), dict) else {}
    local = rp.get(LOCAL) if isinstance(rp.get(LOCAL), dict) else {}
    try:
        hp["rope_theta"] = float(full.get("rope_theta") or cfg.get("rope_theta") or 1e6)
        local_base = float(local.get("rope_theta") or cfg.get("rope_local_base_freq") or 1e4)
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: invalid RoPE base ({e})") from None
    if local_base != arch.rope_freq_base_swa or local.get("rope_type", "default") != "default":
        raise ConvertError(f"{cfg_path}: the sliding layers' RoPE (base {local_base:g}, "
                           f"type {local.get('rope_type', 'default')!r}) is not llama.cpp's "
                           f"fixed unscaled base {arch.rope_freq_base_swa:g}")
    # the global layers' scaling, which hf_hparams reads as any family's rope_scaling
    hp["rope_scaling_source"] = cfg.get("rope_scaling") or full

    scalar = cfg.get("query_pre_attn_scalar", 256)
    want_scale = arch.attn_scale(hp["n_layer"], hp["n_embd"], hp["n_head"], hp["head_dim"])
    try:
        ok = math.isclose(float(scalar) ** -0.5, want_scale, rel_tol=1e-12)
    except (TypeError, ValueError, ZeroDivisionError):
        ok = False
    if not ok:
        raise ConvertError(f"{cfg_path}: query_pre_attn_scalar {scalar!r} is not the "
                           f"attention scale llama.cpp uses for this gemma3 "
                           f"(1/{1 / want_scale ** 2:g}); kiln follows llama.cpp")
