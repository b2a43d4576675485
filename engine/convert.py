"""`kiln convert`: Hugging Face Llama checkpoints and GGUF files to block-quantized GGUF.

    python tools/convert.py SRC -o OUT.gguf --type q4_0|q4_1|q8_0|f16|bf16|f32

SRC is a Hugging Face model directory (LlamaForCausalLM / MistralForCausalLM, safetensors
weights in F32/F16/BF16, one file or sharded; a SentencePiece `tokenizer.model` or a
byte-level BPE `tokenizer.json`) or a GGUF file (requantized, metadata kept).

The work is split in two phases so that every problem with the input is found before a
byte is written: `plan()` reads only headers and JSON and returns the metadata and a list
of `TensorPlan`s (name, shape, source and target type, and a way to read rows); `write()`
then streams the tensors one at a time, in chunks of rows, into formats.GGUFWriter (which
writes atomically): peak memory is bounded by a chunk, not by the largest tensor. Names and metadata keys follow llama.cpp's convert_hf_to_gguf.py so that
llama.cpp loads what we write.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import formats
from engine.errors import ConvertError
from engine.hf_vocab import SPECIAL_KEYS, SPECIAL_KINDS, Vocab, read_hf_tokenizer, read_json
from formats.safetensors import READABLE_DTYPES, SafetensorsFile, bf16_to_f32

GGMLType = formats.GGMLType

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
OUT_TYPES = {
    "f32": GGMLType.F32, "f16": GGMLType.F16, "bf16": GGMLType.BF16,
    "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q4_1": GGMLType.Q4_1,
}
FOUR_BIT = (GGMLType.Q4_0, GGMLType.Q4_1)
BLOCK_TYPES = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0)
# llama.cpp's `general.file_type` (enum llama_ftype) for each output type.
FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3,
              GGMLType.Q8_0: 7, GGMLType.BF16: 32}
QUANTIZATION_VERSION = 2

CHUNK_BYTES = 16 << 20  # float32 rows converted at a time: bounds the temporaries


# -- the tensor plan ---------------------------------------------------------------------

@dataclass
class TensorPlan:
    name: str                       # GGUF tensor name
    shape: tuple                    # NumPy order, GGUF layout
    src_type: str                   # "F32", "BF16", "Q4_1", ...
    out_type: GGMLType
    read_rows: Callable             # (i, j) -> float32 rows i..j of the 2-D view (n_rows, n)
    raw: Callable | None = None     # () -> bytes/array already in out_type (GGUF copy)
    release: Callable = lambda i, j: None   # rows i..j are done: drop their source pages
    note: str | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def out_nbytes(self) -> int:
        block, size = formats.GGML_QUANT_SIZES[self.out_type]
        return self.n_elements // block * size


@dataclass
class Plan:
    metadata: dict                  # key -> value, typed per `types`
    types: dict                     # key -> formats.GGUFValueType (scalars) or (ARRAY, elem)
    tensors: list
    sources: list = field(default_factory=list)   # objects with .close()

    def close(self):
        for s in self.sources:
            s.close()


# -- Q/K permutation ---------------------------------------------------------------------

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF (Meta) interleaved order, as llama.cpp's `permute`."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of unpermute_qk: GGUF interleaved rows -> HF rotate-half rows."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row gather index: GGUF row r is HF row idx[r] (lets us convert in row chunks)."""
    return unpermute_qk(np.arange(n_rows), n_head)


# -- choosing the output type ------------------------------------------------------------

def choose_type(name: str, shape: tuple, target: GGMLType, embed_type: GGMLType):
    """Output type of one tensor and an optional note explaining a fallback."""
    if len(shape) < 2:
        return GGMLType.F32, None  # norms and other vectors: tiny, and precision matters
    t = embed_type if name in ("token_embd.weight", "output.weight") else target
    if t in BLOCK_TYPES and shape[-1] % 32 != 0:
        return GGMLType.F16, (f"note: {name}: row length {shape[-1]} is not a multiple of 32; "
                              f"stored as F16 instead of {t.name}")
    return t, None


# -- Hugging Face checkpoints ------------------------------------------------------------

HF_TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF name of an HF tensor; None for tensors llama.cpp does not use."""
    if name in HF_TENSOR_NAMES:
        return HF_TENSOR_NAMES[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        if parts[3] == "self_attn.rotary_emb.inv_freq":
            return None  # recomputed from rope.freq_base at load time
        if parts[3] in HF_LAYER_NAMES:
            return f"blk.{int(parts[2])}.{HF_LAYER_NAMES[parts[3]]}"
    raise ConvertError(f"unexpected tensor {name!r} in the checkpoint; "
                       f"only the Llama tensors are supported")


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


def hf_hparams(cfg: dict, cfg_path: Path) -> dict:
    archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{cfg_path}: unsupported architecture {arch!r}; "
                           f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        n_embd = int(cfg["hidden_size"])
        n_head = int(cfg["num_attention_heads"])
        hp = dict(
            n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            n_ff=int(cfg["intermediate_size"]),
            n_ctx=int(cfg.get("max_position_embeddings") or 2048),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{cfg_path}: missing or invalid hyperparameter {e}") from None
    scaling = cfg.get("rope_scaling")
    hp["rope_scaling"] = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            hp["rope_scaling"] = ("linear", float(scaling["factor"]))
        elif kind == "llama3":
            hp["rope_scaling"] = ("llama3", scaling)
        elif kind not in (None, "default"):
            raise ConvertError(f"{cfg_path}: rope_scaling type {kind!r} is not supported; "
                               f"supported: linear, llama3")
    return hp


def plan_hf(src: Path, out: Path, target: GGMLType, embed_type: GGMLType) -> Plan:
    cfg_path = src / "config.json"
    cfg = read_json(cfg_path)
    hp = hf_hparams(cfg, cfg_path)
    weight_files = _hf_weight_files(src)
    out_real = os.path.realpath(out)
    for p in set(weight_files.values()):
        if os.path.realpath(p) == out_real:
            raise ConvertError(f"output {out} is one of the source's weight files; "
                               f"write the GGUF to another path")
    vocab = read_hf_tokenizer(src, hp["n_vocab"], cfg)

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
        plan.metadata, plan.types = hf_metadata(src, cfg, hp, vocab, target)
        plan.tensors = _hf_tensor_plans(located, hp, target, embed_type)
    except BaseException:
        plan.close()
        raise
    return plan


def _hf_tensor_plans(located: dict, hp: dict, target, embed_type) -> list:
    plans = {}
    for hf_name, st in located.items():
        name = hf_to_gguf_name(hf_name)
        if name is None:
            continue
        if name == "output.weight" and hp["tied"]:
            continue  # tied: the output matrix is token_embd, written once
        info = st.tensors[hf_name]
        if info.dtype not in READABLE_DTYPES:
            raise ConvertError(f"{st.path}: tensor {hf_name!r} has dtype {info.dtype}; "
                               f"supported: {', '.join(READABLE_DTYPES)}")
        n_head = {"attn_q.weight": hp["n_head"], "attn_k.weight": hp["n_head_kv"]}.get(
            name.split(".", 2)[-1])
        plans[name] = _safetensors_plan(name, st, hf_name, n_head, target, embed_type)

    # Every tensor the llama graph needs must be there, with the right shape.
    hd, kv = hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
    want = {"token_embd.weight": (hp["n_vocab"], hp["n_embd"]),
            "output_norm.weight": (hp["n_embd"],)}
    if not hp["tied"]:
        want["output.weight"] = (hp["n_vocab"], hp["n_embd"])
    for i in range(hp["n_layer"]):
        want.update({
            f"blk.{i}.attn_norm.weight": (hp["n_embd"],),
            f"blk.{i}.attn_q.weight": (hp["n_head"] * hd, hp["n_embd"]),
            f"blk.{i}.attn_k.weight": (kv, hp["n_embd"]),
            f"blk.{i}.attn_v.weight": (kv, hp["n_embd"]),
            f"blk.{i}.attn_output.weight": (hp["n_embd"], hp["n_head"] * hd),
            f"blk.{i}.ffn_norm.weight": (hp["n_embd"],),
            f"blk.{i}.ffn_gate.weight": (hp["n_ff"], hp["n_embd"]),
            f"blk.{i}.ffn_up.weight": (hp["n_ff"], hp["n_embd"]),
            f"blk.{i}.ffn_down.weight": (hp["n_embd"], hp["n_ff"]),
        })
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


def _gguf_order(names) -> list:
    # llama.cpp's order: token_embd, the blocks in order, output_norm, output.
    def key(n):
        if n.startswith("blk."):
            return (1, int(n.split(".")[1]), n)
        return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(n, 3), 0, n)
    return sorted(names, key=key)


def _safetensors_plan(name, st: SafetensorsFile, hf_name, n_head, target, embed_type):
    info = st.tensors[hf_name]
    shape = info.shape
    out_type, note = choose_type(name, shape, target, embed_type)
    n = shape[-1] if shape else 1
    n_rows = info.n_elements // max(1, n)  # a vector is one row
    rows_idx = unpermute_rows(n_rows, n_head) if n_head else None

    def read_rows(i, j):
        view = st.tensor(hf_name).reshape(n_rows, n)
        rows = view[rows_idx[i:j]] if rows_idx is not None else view[i:j]
        if info.dtype == "BF16":
            return bf16_to_f32(rows)
        return np.asarray(rows, dtype=np.float32)

    def release(i, j):
        if rows_idx is None:  # permuted rows come from all over the tensor: released at the end
            st.release(hf_name, i * row_bytes, j * row_bytes)
        elif j == n_rows:
            st.release(hf_name)

    row_bytes = n * (4 if info.dtype == "F32" else 2)
    return TensorPlan(name, shape, info.dtype, out_type, read_rows, release=release, note=note)


# -- metadata ----------------------------------------------------------------------------

def hf_metadata(src: Path, cfg: dict, hp: dict, vocab: Vocab, target) -> tuple[dict, dict]:
    VT = formats.GGUFValueType
    md, ty = {}, {}

    def put(key, value, vtype):
        md[key], ty[key] = value, vtype

    name = cfg.get("_name_or_path") or src.resolve().name
    put("general.architecture", "llama", VT.STRING)
    put("general.name", Path(str(name)).name or "model", VT.STRING)
    put("general.file_type", FILE_TYPES[target], VT.UINT32)
    if target in BLOCK_TYPES:
        put("general.quantization_version", QUANTIZATION_VERSION, VT.UINT32)
    put("llama.vocab_size", hp["n_vocab"], VT.UINT32)
    put("llama.context_length", hp["n_ctx"], VT.UINT32)
    put("llama.embedding_length", hp["n_embd"], VT.UINT32)
    put("llama.block_count", hp["n_layer"], VT.UINT32)
    put("llama.feed_forward_length", hp["n_ff"], VT.UINT32)
    put("llama.rope.dimension_count", hp["head_dim"], VT.UINT32)
    put("llama.attention.head_count", hp["n_head"], VT.UINT32)
    put("llama.attention.head_count_kv", hp["n_head_kv"], VT.UINT32)
    put("llama.attention.layer_norm_rms_epsilon", hp["rms_eps"], VT.FLOAT32)
    put("llama.rope.freq_base", hp["rope_theta"], VT.FLOAT32)
    if hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        put("llama.attention.key_length", hp["head_dim"], VT.UINT32)
        put("llama.attention.value_length", hp["head_dim"], VT.UINT32)
    if hp["rope_scaling"] and hp["rope_scaling"][0] == "linear":
        put("llama.rope.scaling.type", "linear", VT.STRING)
        put("llama.rope.scaling.factor", hp["rope_scaling"][1], VT.FLOAT32)
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


# -- GGUF sources (requantization) -------------------------------------------------------

DEQUANTIZABLE = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_0, GGMLType.Q4_1,
                 GGMLType.Q8_0)


def plan_gguf(src: Path, out: Path, target: GGMLType, embed_type: GGMLType) -> Plan:
    if os.path.realpath(src) == os.path.realpath(out):
        raise ConvertError(f"output {out} is the source file; write the GGUF to another path")
    try:
        f = formats.read_gguf(src)
    except formats.FormatError as e:
        raise ConvertError(f"{src}: {e}") from None
    plan = Plan({}, {}, [], sources=[f])
    try:
        arch = f.metadata.get("general.architecture")
        if arch != "llama":
            raise ConvertError(f"{src}: unsupported architecture {arch!r}; supported: llama")
        plan.metadata = dict(f.metadata)
        plan.types = {k: tuple(v) for k, v in f.metadata.types.items()}
        plan.metadata["general.file_type"] = FILE_TYPES[target]
        plan.types["general.file_type"] = (formats.GGUFValueType.UINT32,)
        if target in BLOCK_TYPES or any(t.type in BLOCK_TYPES for t in f.tensors.values()):
            plan.metadata["general.quantization_version"] = QUANTIZATION_VERSION
            plan.types["general.quantization_version"] = (formats.GGUFValueType.UINT32,)
        for t in f.tensors.values():
            plan.tensors.append(_gguf_tensor_plan(src, t, target, embed_type))
    except BaseException:
        plan.close()
        raise
    return plan


def _gguf_tensor_plan(src, t, target, embed_type) -> TensorPlan:
    shape = tuple(t.shape)
    out_type, note = choose_type(t.name, shape, target, embed_type)
    if t.type == out_type:
        # Same type: copy the bytes, so requantizing never loses more than it must.
        return TensorPlan(t.name, shape, t.type.name, out_type, None, raw=lambda: t.data,
                          note=note)
    if t.type not in DEQUANTIZABLE:
        raise ConvertError(f"{src}: tensor {t.name} has type {t.type.name}; supported "
                           f"source types: {', '.join(x.name for x in DEQUANTIZABLE)}")
    n = shape[-1]
    n_rows = t.n_elements // n
    row_bytes = formats.row_nbytes(t.type, n)

    def read_rows(i, j):
        raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n_rows, row_bytes)
        return formats.dequantize(raw[i:j], t.type, (j - i, n)).astype(np.float32, copy=False)

    return TensorPlan(t.name, shape, t.type.name, out_type, read_rows, note=note)


# -- writing -----------------------------------------------------------------------------

def encode_rows(x: np.ndarray, t: GGMLType) -> np.ndarray:
    """float32 rows -> raw bytes of type t, row for row (uint8, (rows, row bytes))."""
    return formats.quantize(x, t)


def decode_rows(q: np.ndarray, t: GGMLType, shape) -> np.ndarray:
    return formats.dequantize(q, t, shape)


def convert_tensor(w, tp: TensorPlan, want_rmse: bool, progress=lambda n: None) -> float:
    """Write tensor tp into GGUFWriter w in its output type, one chunk of rows at a time
    (read from the memory-mapped source, encoded, written, its source pages released), so
    memory holds one chunk, never the whole tensor in either type. Returns the RMSE."""
    if tp.raw is not None:
        w.write_tensor(tp.name, tp.raw())  # the writer copies it in bounded pieces
        progress(tp.out_nbytes)
        return 0.0
    n = tp.shape[-1] if tp.shape else 1
    n_rows = tp.n_elements // n if n else 0
    step = max(1, CHUNK_BYTES // (4 * max(1, n)))
    sq_err = 0.0
    for i in range(0, n_rows, step):
        j = min(n_rows, i + step)
        x = tp.read_rows(i, j).reshape(j - i, n)
        q = encode_rows(x, tp.out_type)
        if want_rmse and tp.out_type != GGMLType.F32:
            d = decode_rows(q, tp.out_type, (j - i, n)) - x
            sq_err += float(np.dot(d.ravel(), d.ravel()))
        w.write_tensor_chunk(tp.name, q.view(np.uint8).reshape(-1))
        progress(q.nbytes)
        del x, q
        tp.release(i, j)
    if n_rows == 0:
        w.write_tensor(tp.name, np.zeros(0, np.uint8))  # an empty tensor still takes its turn
    return (sq_err / max(1, tp.n_elements)) ** 0.5


def _key_type(t) -> tuple:
    if t is None:
        return ()
    return tuple(t) if isinstance(t, tuple) else (t,)


def write(plan: Plan, out, quiet: bool = False) -> dict:
    """Stream the planned tensors into `out` (atomically) and return summary numbers."""
    from tqdm import tqdm
    for tp in plan.tensors:
        if tp.note:
            print(tp.note, file=sys.stderr)
    total = sum(tp.out_nbytes for tp in plan.tensors)
    n_params = sum(tp.n_elements for tp in plan.tensors)
    with formats.GGUFWriter(out) as w:
        types = getattr(plan.metadata, "types", {})
        for key, value in plan.metadata.items():
            w.add_key(key, value, *_key_type(plan.types.get(key, types.get(key))))
        for tp in plan.tensors:
            w.add_tensor_info(tp.name, tp.out_type, tp.shape)
        w.write_header()
        width = max(len(tp.name) for tp in plan.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                  desc="writing", leave=False, file=sys.stderr) as bar:
            for k, tp in enumerate(plan.tensors):
                rmse = convert_tensor(w, tp, want_rmse=not quiet, progress=bar.update)
                if not quiet:
                    shape = "x".join(str(d) for d in tp.shape)
                    bar.write(f"[{k + 1:{len(str(len(plan.tensors)))}d}/{len(plan.tensors)}] "
                              f"{tp.name:<{width}} {shape:>12} {tp.src_type:>5} -> "
                              f"{tp.out_type.name:<5} rmse {rmse:.2e}", file=sys.stdout)
    return {"n_params": n_params, "tensor_bytes": total,
            "bpw": 8.0 * total / max(1, n_params)}


# -- the program -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln convert",
        description="Convert a Hugging Face Llama checkpoint directory or a GGUF file to a "
                    "block-quantized GGUF file.")
    p.add_argument("src", metavar="SRC",
                   help="Hugging Face model directory (config.json, *.safetensors, tokenizer) "
                        "or a .gguf file to requantize")
    p.add_argument("-o", "--outfile", dest="out", metavar="OUT.gguf", required=True,
                   help="output GGUF path (written atomically)")
    p.add_argument("--type", dest="type", default="q8_0", choices=list(OUT_TYPES),
                   help="weight type of the 2-D tensors (default q8_0)")
    p.add_argument("--embed-type", dest="embed_type", default=None, choices=list(OUT_TYPES),
                   help="type of token_embd/output (default: q8_0 for 4-bit --type, "
                        "else --type)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-tensor lines")
    return p


def plan(src, out, out_type: str = "q8_0", embed_type: str | None = None) -> Plan:
    """Read and check everything the conversion needs; raises ConvertError, writes nothing."""
    src, out = Path(src), Path(out)
    target = OUT_TYPES[out_type]
    embed = OUT_TYPES[embed_type] if embed_type else (
        GGMLType.Q8_0 if target in FOUR_BIT else target)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    if out.is_dir():
        raise ConvertError(f"output {out} is a directory; give a file path such as "
                           f"{out / 'model.gguf'}")
    if not out.resolve().parent.is_dir():
        raise ConvertError(f"output directory {out.resolve().parent} does not exist")
    if src.is_dir():
        return plan_hf(src, out, target, embed)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ConvertError(f"{src}: not a GGUF file or a Hugging Face model directory")
    return plan_gguf(src, out, target, embed)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        p = plan(args.src, args.out, args.type, args.embed_type)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        stats = write(p, args.out, quiet=args.quiet)
    except (ConvertError, formats.FormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        p.close()
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB, {stats['n_params'] / 1e6:.1f} M "
          f"parameters, {stats['bpw']:.2f} bits per weight, {len(p.tensors)} tensors "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
