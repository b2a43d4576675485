"""Planning the conversion of a Hugging Face checkpoint of a family in engine/arch
(Llama/Mistral, Qwen2, Qwen3, Phi-3, Gemma 3): config.json's hyperparameters, the safetensors shards, the
tensors the family's graph needs, and the GGUF metadata (keys as llama.cpp's
convert_hf_to_gguf.py writes them, under the family's prefix)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

import formats
from engine.convert.mixes import (QUANTIZATION_VERSION, Mix, ModelFacts, is_block_type,
                                  layer_of, tensor_type)
from engine import arch as architectures
from engine.config import ModelConfig
from engine.convert.gemma3 import gemma3_hparams
from engine.convert.naming import _gguf_order, hf_to_gguf_name, unpermute_rows
from engine.convert.plan import Plan, TensorPlan
from engine.convert.vocab import SPECIAL_KEYS, SPECIAL_KINDS, Vocab, read_hf_tokenizer, read_json
from engine.errors import ConvertError
from formats.safetensors import READABLE_DTYPES, SafetensorsFile, bf16_to_f32

GGMLType = formats.GGMLType


SUPPORTED_ARCHITECTURES = tuple(c for a in architectures.ARCHITECTURES.values()
                                for c in a.hf_classes)


def _hf_weight_files(src: Path) -> dict:
    """{tensor name: shard path} from model.safetensors or the sharded index."""
    index_path = src / "model.safetensors.index.json"
    single = src / "model.safetensors"
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index_path}: no weight_map")
        files = {}
        for shard in sorted(set(weight_map.values())):
            p = src / shard
            if not p.is_file():
                raise ConvertError(f"{index_path} lists shard {shard} but {p} is missing")
            files[shard] = p
        return {name: files[shard] for name, shard in weight_map.items()}
    if single.is_file():
        return {None: single}
    if list(src.glob("*.bin")) or list(src.glob("*.pth")):
        raise ConvertError(f"{src}: only PyTorch pickle weights found; "
                           f"supported: model.safetensors or sharded safetensors with "
                           f"model.safetensors.index.json")
    raise ConvertError(f"{src}: no model.safetensors or model.safetensors.index.json")


def text_config(cfg: dict) -> dict:
    """The config kiln converts: a multimodal checkpoint's text_config (with the top
    level's class and name), any other config as it is; the family's defaults fill in
    the keys it leaves out."""
    archs = cfg.get("architectures") or []
    arch = architectures.for_hf_class(archs[0]) if archs else None
    if arch is None:
        return cfg
    if archs[0] in arch.hf_multimodal:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConvertError(f"config.json of {archs[0]} has no text_config")
        cfg = {**text, "architectures": archs, "_name_or_path": cfg.get("_name_or_path")}
    return {**dict(arch.hf_defaults), **cfg}


def hf_hparams(cfg: dict, cfg_path: Path) -> dict:
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    arch = architectures.for_hf_class(archs[0])
    if arch is None:
        raise ConvertError(f"{cfg_path}: unsupported architecture {archs[0]!r}; "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    _check_variations(cfg, cfg_path, arch)
    try:
        n_embd = int(cfg["hidden_size"])
        n_head = int(cfg["num_attention_heads"])
        hp = dict(
            n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            n_ff=int(cfg["intermediate_size"]),
            n_ctx=int(cfg.get("max_position_embeddings") or 2048),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", _rope_params(cfg).get("rope_theta", 10000.0))),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            arch=arch,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: missing or invalid hyperparameter {e}") from None
    hp["rope_dim"] = hp["head_dim"]
    hp["n_swa"] = 0
    if arch.name == "phi3":
        _phi3_hparams(cfg, cfg_path, hp)
    if arch.name == "gemma3":
        gemma3_hparams(cfg, cfg_path, hp)
    scaling = hp.pop("rope_scaling_source", None) or cfg.get("rope_scaling") or _rope_params(cfg)
    hp["rope_scaling"] = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            hp["rope_scaling"] = ("linear", float(scaling["factor"]))
        elif kind == "llama3":
            hp["rope_scaling"] = ("llama3", scaling)
        elif kind in ("longrope", "su") and arch.name == "phi3":
            hp["rope_scaling"] = ("longrope", _longrope(scaling, hp, cfg_path))
        elif kind not in (None, "default"):
            raise ConvertError(f"{cfg_path}: rope_scaling type {kind!r} is not supported; "
                               f"supported: linear, llama3" +
                               (", longrope" if arch.name == "phi3" else ""))
    return hp


def _rope_params(cfg: dict) -> dict:
    """transformers 5's rope_parameters (rope_theta, rope_type and the scaling's fields,
    which older config.json files keep at the top level and in rope_scaling)."""
    rp = cfg.get("rope_parameters")
    return rp if isinstance(rp, dict) else {}


def _phi3_hparams(cfg: dict, cfg_path: Path, hp: dict):
    """Phi-3's RoPE as llama.cpp's Phi3MiniModel writes it: partial_rotary_factor of
    n_embd over the heads (Phi-4-mini), and the context LongRoPE was trained for."""
    try:
        rp = _rope_params(cfg)
        rot = float(cfg.get("partial_rotary_factor") or rp.get("partial_rotary_factor") or 1.0)
        hp["rope_dim"] = int(rot * hp["n_embd"]) // hp["n_head"]
        hp["n_ctx_orig"] = int(cfg.get("original_max_position_embeddings")
                               or rp.get("original_max_position_embeddings") or hp["n_ctx"])
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: invalid RoPE hyperparameter ({e})") from None
    if hp["rope_dim"] % 2 or not 0 < hp["rope_dim"] <= hp["head_dim"]:
        raise ConvertError(f"{cfg_path}: partial_rotary_factor gives {hp['rope_dim']} rotated "
                           f"dims of a head of {hp['head_dim']}; they must be even and fit")


def _longrope(scaling: dict, hp: dict, cfg_path: Path) -> dict:
    """LongRoPE's short and long per-dimension factors (rope_dim / 2 each) and its
    attention factor sqrt(1 + log(s) / log(n_ctx_orig)), s = max_position_embeddings /
    original_max_position_embeddings, as llama.cpp's converter computes it (it does not
    read a rope_scaling.attention_factor, and neither does kiln)."""
    out = {}
    for kind in ("short", "long"):
        f = scaling.get(f"{kind}_factor")
        try:
            f = np.asarray(f, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            f = None
        if f is None or f.shape != (hp["rope_dim"] // 2,) or not np.all(f > 0):
            raise ConvertError(f"{cfg_path}: rope_scaling.{kind}_factor must be "
                               f"{hp['rope_dim'] // 2} positive numbers (rope dims / 2)")
        out[kind] = f
    scale = hp["n_ctx"] / hp["n_ctx_orig"]
    out["attn_factor"] = (float(np.sqrt(1 + np.log(scale) / np.log(hp["n_ctx_orig"])))
                          if scale > 1.0 else 1.0)
    return out


def _check_variations(cfg: dict, cfg_path: Path, arch):
    """Refuse what config.json asks for beyond the family's graph as llama.cpp runs it
    (gemma3's own checks: engine/convert/gemma3.py)."""
    if arch.name == "gemma3":
        return
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{cfg_path}: hidden_act {act!r} is not supported for "
                           f"{arch.name}; supported: silu")
    if cfg.get("use_sliding_window"):
        raise ConvertError(f"{cfg_path}: use_sliding_window is true; kiln's {arch.name} "
                           f"attends to the whole context, as llama.cpp does")
    if not arch.attn_qkv_bias and cfg.get("attention_bias"):
        raise ConvertError(f"{cfg_path}: attention_bias is true; {arch.name} as llama.cpp "
                           f"runs it has no attention biases")


def model_config(hp: dict) -> ModelConfig:
    """The engine's config of the checkpoint, whose architecture's tensor declarations
    give the shapes the checkpoint must have."""
    return ModelConfig(
        arch=hp["arch"], n_vocab=hp["n_vocab"], n_embd=hp["n_embd"], n_layer=hp["n_layer"],
        n_head=hp["n_head"], n_head_kv=hp["n_head_kv"], head_dim=hp["head_dim"],
        n_ff=hp["n_ff"], n_ctx_train=hp["n_ctx"], rms_eps=hp["rms_eps"],
        rope_freq_base=hp["rope_theta"], rope_dim=hp["rope_dim"], rope_freq_scale=1.0,
        tied_output=hp["tied"], n_swa=hp["n_swa"])


def plan_hf(src: Path, out: Path, mix: Mix, embed_type: GGMLType | None) -> Plan:
    cfg_path = src / "config.json"
    cfg = text_config(read_json(cfg_path))
    hp = hf_hparams(cfg, cfg_path)
    weight_files = _hf_weight_files(src)
    vocab = read_hf_tokenizer(src, hp["n_vocab"], cfg, hp["arch"])

    # Open every shard and index its tensors (headers only).
    opened = {}
    plan = Plan({}, {}, [])
    try:
        for p in sorted(set(weight_files.values())):
            try:
                opened[p] = SafetensorsFile(p)
            except formats.FormatError as e:
                raise ConvertError(str(e)) from None
            plan.sources.append(opened[p])
        located = {}
        for p, st in opened.items():
            for name in st.tensors:
                located[name] = st
        plan.metadata, plan.types = hf_metadata(src, cfg, hp, vocab, mix)
        plan.tensors = _hf_tensor_plans(located, hp, mix, embed_type)
    except BaseException:
        plan.close()
        raise
    return plan


def _hf_tensor_plans(located: dict, hp: dict, mix, embed_type) -> list:
    plans = {}
    model = ModelFacts(hp["n_layer"], hp["n_head"] // hp["n_head_kv"], hp["tied"])
    arch = hp["arch"]
    for hf_name, st in located.items():
        name = hf_to_gguf_name(hf_name, arch, hp["n_layer"])
        if name is None:
            continue
        if name == "output.weight" and hp["tied"]:
            continue  # tied: the output matrix is token_embd, written once
        info = st.tensors[hf_name]
        if info.dtype not in READABLE_DTYPES:
            raise ConvertError(f"{st.path}: tensor {hf_name!r} has dtype {info.dtype}; "
                               f"supported: {', '.join(READABLE_DTYPES)}")
        # Llama GGUFs store Q and K in Meta's interleaved order; NEOX families keep HF's
        n_head = None if arch.rope_neox else {
            "attn_q.weight": hp["n_head"], "attn_k.weight": hp["n_head_kv"]}.get(
            name.split(".", 2)[-1])
        out_type, note = tensor_type(name, info.shape, layer_of(name), mix, model, embed_type)
        shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
        plans[name] = _safetensors_plan(name, st, hf_name, n_head, out_type, note, shift)

    # Every tensor the family's graph needs must be there, with the right shape.
    want = {name: shape for name, (shape, _) in
            arch.tensor_shapes(model_config(hp)).items()}
    for name, shape in want.items():
        if name not in plans:
            if name == "output.weight":
                raise ConvertError("checkpoint has no lm_head.weight and "
                                   "tie_word_embeddings is false")
            raise ConvertError(f"checkpoint lacks the tensor for {name}")
        if tuple(plans[name].shape) != shape:
            raise ConvertError(f"tensor {name} has shape {tuple(plans[name].shape)}; "
                               f"config.json implies {shape}")
    extra = sorted(set(plans) - set(want))
    if extra:
        raise ConvertError(f"tensor {extra[0]} does not fit config.json "
                           f"(num_hidden_layers={hp['n_layer']})")
    ordered = [plans[n] for n in _gguf_order(want)]
    if hp["rope_scaling"] and hp["rope_scaling"][0] == "llama3":
        factors = llama3_rope_factors(hp["rope_scaling"][1], hp["rope_theta"], hp["head_dim"])
        ordered.insert(0, TensorPlan("rope_freqs.weight", factors.shape, "F32", GGMLType.F32,
                                     lambda i, j: factors.reshape(1, -1)))
    if hp["rope_scaling"] and hp["rope_scaling"][0] == "longrope":
        for kind in ("long", "short"):  # llama.cpp's converter writes them first
            f = hp["rope_scaling"][1][kind]
            ordered.insert(0, TensorPlan(f"rope_factors_{kind}.weight", f.shape, "F32",
                                         GGMLType.F32, lambda i, j, f=f: f.reshape(1, -1)))
    return ordered


def llama3_rope_factors(scaling: dict, base: float, dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors, which llama.cpp stores as rope_freqs.weight:
    1 for short wavelengths, `factor` for long ones, a smooth blend in between."""
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, out)
    out = np.where(wavelen > old_ctx / low, factor, out)
    return out.astype(np.float32)


def _safetensors_plan(name, st: SafetensorsFile, hf_name, n_head, out_type, note,
                      shift: float = 0.0):
    """shift is added to every value (Gemma's norm weights, stored as w + 1), in float32."""
    info = st.tensors[hf_name]
    shape = info.shape
    n = shape[-1] if shape else 1
    n_rows = info.n_elements // max(1, n)  # a vector is one row
    rows_idx = unpermute_rows(n_rows, n_head) if n_head else None

    def read_rows(i, j):
        view = st.tensor(hf_name).reshape(n_rows, n)
        rows = view[rows_idx[i:j]] if rows_idx is not None else view[i:j]
        rows = bf16_to_f32(rows) if info.dtype == "BF16" else np.asarray(rows, dtype=np.float32)
        return rows + np.float32(shift) if shift else rows

    def release(i, j):
        if rows_idx is None:  # permuted rows come from all over the tensor: released at the end
            st.release(hf_name, i * row_bytes, j * row_bytes)
        elif j == n_rows:
            st.release(hf_name)

    row_bytes = n * (4 if info.dtype == "F32" else 2)
    return TensorPlan(name, shape, info.dtype, out_type, read_rows, release=release, note=note)


def hf_metadata(src: Path, cfg: dict, hp: dict, vocab: Vocab, mix: Mix) -> tuple[dict, dict]:
    VT = formats.GGUFValueType
    md, ty = {}, {}

    def put(key, value, vtype):
        md[key], ty[key] = value, vtype

    name = cfg.get("_name_or_path") or src.resolve().name
    prefix = hp["arch"].name
    put("general.architecture", prefix, VT.STRING)
    put("general.name", Path(str(name)).name or "model", VT.STRING)
    put("general.file_type", int(mix.file_type), VT.UINT32)
    if is_block_type(mix.default):
        put("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32)
    put(f"{prefix}.vocab_size", hp["n_vocab"], VT.UINT32)
    put(f"{prefix}.context_length", hp["n_ctx"], VT.UINT32)
    put(f"{prefix}.embedding_length", hp["n_embd"], VT.UINT32)
    put(f"{prefix}.block_count", hp["n_layer"], VT.UINT32)
    put(f"{prefix}.feed_forward_length", hp["n_ff"], VT.UINT32)
    put(f"{prefix}.rope.dimension_count", hp["rope_dim"], VT.UINT32)
    put(f"{prefix}.attention.head_count", hp["n_head"], VT.UINT32)
    put(f"{prefix}.attention.head_count_kv", hp["n_head_kv"], VT.UINT32)
    put(f"{prefix}.attention.layer_norm_rms_epsilon", hp["rms_eps"], VT.FLOAT32)
    put(f"{prefix}.rope.freq_base", hp["rope_theta"], VT.FLOAT32)
    if hp["n_swa"]:
        put(f"{prefix}.attention.sliding_window", hp["n_swa"], VT.UINT32)
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"] or hp["arch"].name == "gemma3":
        put(f"{prefix}.attention.key_length", hp["head_dim"], VT.UINT32)
        put(f"{prefix}.attention.value_length", hp["head_dim"], VT.UINT32)
    if hp["rope_scaling"] and hp["rope_scaling"][0] == "linear":
        put(f"{prefix}.rope.scaling.type", "linear", VT.STRING)
        put(f"{prefix}.rope.scaling.factor", hp["rope_scaling"][1], VT.FLOAT32)
    if "n_ctx_orig" in hp:  # phi3, as llama.cpp's Phi3MiniModel writes it
        put(f"{prefix}.rope.scaling.original_context_length", hp["n_ctx_orig"], VT.UINT32)
        # llama.cpp reads the window and switches it off for phi3; kiln ignores it too
        put(f"{prefix}.attention.sliding_window", int(cfg.get("sliding_window") or 0),
            VT.UINT32)
    if hp["rope_scaling"] and hp["rope_scaling"][0] == "longrope":
        put(f"{prefix}.rope.scaling.attn_factor", hp["rope_scaling"][1]["attn_factor"],
            VT.FLOAT32)
    put("tokenizer.ggml.model", vocab.model, VT.STRING)
    if vocab.pre is not None:
        put("tokenizer.ggml.pre", vocab.pre, VT.STRING)
    put("tokenizer.ggml.tokens", vocab.tokens, (VT.ARRAY, VT.STRING))
    if vocab.scores is not None:
        put("tokenizer.ggml.scores", [float(s) for s in vocab.scores], (VT.ARRAY, VT.FLOAT32))
    put("tokenizer.ggml.token_type", vocab.types, (VT.ARRAY, VT.INT32))
    if vocab.merges:
        put("tokenizer.ggml.merges", vocab.merges, (VT.ARRAY, VT.STRING))
    if vocab.add_space_prefix is not None:
        put("tokenizer.ggml.add_space_prefix", vocab.add_space_prefix, VT.BOOL)
    for kind in SPECIAL_KINDS:
        if kind in vocab.special:
            put(SPECIAL_KEYS[kind], vocab.special[kind], VT.UINT32)
    for kind in ("bos", "eos"):
        if kind in vocab.add_special:
            put(f"tokenizer.ggml.add_{kind}_token", vocab.add_special[kind], VT.BOOL)
    if vocab.chat_template:
        put("tokenizer.chat_template", vocab.chat_template, VT.STRING)
    return md, ty

