"""A llama GGUF file as a Hugging Face checkpoint directory (`python tools/export_hf.py`).

The inverse of `kiln convert`: tensors are dequantized (to F32 by default), Q and K rows are
permuted back into Hugging Face's rotate-half order, and `config.json`,
`model.safetensors` (or N shards with an index), `generation_config.json`,
`tokenizer_config.json` and the tokenizer (`tokenizer.json` for byte-level BPE,
`tokenizer.model` for SentencePiece) are written. It lets tests build a realistic
checkpoint from real weights without any download, and lets `transformers` check kiln.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import formats
from engine.arch import llama
from engine.convert.naming import permute_qk
from engine.convert.vocab import (SPECIAL_KEYS, TOKEN_BYTE, TOKEN_CONTROL, TOKEN_UNUSED,
                                  TOKEN_USER_DEFINED, pre_tokenizer_json)
from engine.errors import ConvertError
from formats.atomic import atomic_write
from formats.safetensors import write_safetensors

# GGUF name -> HF name, per-layer names with `{i}` for the layer (llama's declaration)
GGUF_TO_HF = {s.gguf: s.hf for s in llama.ARCH.tensors}
DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def hf_name(name: str) -> str:
    if name in GGUF_TO_HF:
        return GGUF_TO_HF[name]
    _, layer, rest = name.split(".", 2)
    return GGUF_TO_HF["blk.{i}." + rest].format(i=int(layer))


def hf_config(md: dict, tied: bool, dtype: str) -> dict:
    n_embd = int(md["llama.embedding_length"])
    n_head = int(md["llama.attention.head_count"])
    head_dim = int(md.get("llama.attention.key_length")
                   or md.get("llama.rope.dimension_count") or n_embd // n_head)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": n_embd,
        "intermediate_size": int(md["llama.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_hidden_layers": int(md["llama.block_count"]),
        "num_key_value_heads": int(md.get("llama.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "max_position_embeddings": int(md.get("llama.context_length", 2048)),
        "rms_norm_eps": float(md["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(md.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(md.get("llama.vocab_size") or len(md["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": TORCH_DTYPES[dtype],
    }
    if md.get("general.name"):
        cfg["_name_or_path"] = str(md["general.name"])
    if md.get("llama.rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(md["llama.rope.scaling.factor"])}
    for kind in ("bos", "eos", "pad"):
        if SPECIAL_KEYS[kind] in md:
            cfg[f"{kind}_token_id"] = int(md[SPECIAL_KEYS[kind]])
    return cfg


# -- tokenizers --------------------------------------------------------------------------

def tokenizer_config(md: dict, fast: bool) -> dict:
    tokens, types = md["tokenizer.ggml.tokens"], list(md["tokenizer.ggml.token_type"])
    tc = {"tokenizer_class": "PreTrainedTokenizerFast" if fast else "LlamaTokenizer",
          "clean_up_tokenization_spaces": False,
          "model_max_length": int(md.get("llama.context_length", 2048))}
    if not fast:
        tc["legacy"] = False  # no space is inserted after special tokens (llama.cpp's way)
    for kind in ("bos", "eos"):
        key = f"tokenizer.ggml.add_{kind}_token"
        if key in md:
            tc[f"add_{kind}_token"] = bool(md[key])
    for kind in ("bos", "eos", "unk", "sep", "pad"):
        if SPECIAL_KEYS[kind] in md:
            tc[f"{kind}_token"] = tokens[int(md[SPECIAL_KEYS[kind]])]
    if fast:  # SentencePiece pieces carry their own types: tokenizer.model is enough
        tc["added_tokens_decoder"] = {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                     "rstrip": False, "single_word": False, "special": types[i] == TOKEN_CONTROL}
            for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
    if "tokenizer.chat_template" in md:
        tc["chat_template"] = md["tokenizer.chat_template"]
    return tc


def bpe_tokenizer_json(md: dict) -> dict:
    tokens, types = md["tokenizer.ggml.tokens"], list(md["tokenizer.ggml.token_type"])
    pre = md.get("tokenizer.ggml.pre", "gpt-2")
    add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": types[i] == TOKEN_CONTROL}
             for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    vocab = {}
    for i, t in enumerate(tokens):
        if types[i] != TOKEN_UNUSED:
            vocab.setdefault(t, i)
    byte_level = {"type": "ByteLevel", "add_prefix_space": add_prefix, "trim_offsets": False,
                  "use_regex": True}
    post = byte_level
    bos_key = SPECIAL_KEYS["bos"]
    if md.get("tokenizer.ggml.add_bos_token") and bos_key in md:
        bos = tokens[int(md[bos_key])]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                           {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                         {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [int(md[bos_key])],
                                         "tokens": [bos]}}}
    try:
        pre_tok = pre_tokenizer_json(pre, add_prefix)
    except ValueError:
        raise ConvertError(f"BPE pre-tokenizer {pre!r} cannot be exported") from None
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre_tok, "post_processor": post,
        "decoder": dict(byte_level, add_prefix_space=True, trim_offsets=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": list(md.get("tokenizer.ggml.merges", []))},
    }


def spm_model_proto(md: dict) -> bytes:
    """A SentencePiece ModelProto carrying the GGUF vocabulary (pieces, scores, types)."""
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    tokens = md["tokenizer.ggml.tokens"]
    scores = list(md.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types = list(md["tokenizer.ggml.token_type"])
    for t, s, ty in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = t, float(s), int(ty)
    ts = proto.trainer_spec
    ts.model_type = sentencepiece_model_pb2.TrainerSpec.BPE  # llama.cpp's SPM merges by score
    ts.vocab_size = len(tokens)
    ts.byte_fallback = TOKEN_BYTE in types
    for kind, field in (("unk", "unk_id"), ("bos", "bos_id"), ("eos", "eos_id"),
                        ("pad", "pad_id")):
        setattr(ts, field, int(md[SPECIAL_KEYS[kind]]) if SPECIAL_KEYS[kind] in md else -1)
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return proto.SerializeToString()


# -- the export --------------------------------------------------------------------------

def export(gguf_path, out_dir, dtype: str = "f32", shards: int = 1) -> Path:
    out_dir = Path(out_dir)
    st_dtype = DTYPES[dtype]
    with formats.read_gguf(gguf_path) as f:
        md = f.metadata
        if md.get("general.architecture") != "llama":
            raise ConvertError(f"{gguf_path}: unsupported architecture "
                               f"{md.get('general.architecture')!r}; supported: llama")
        n_head = int(md["llama.attention.head_count"])
        n_head_kv = int(md.get("llama.attention.head_count_kv", n_head))
        tok_model = md.get("tokenizer.ggml.model")
        if tok_model not in ("gpt2", "llama"):
            raise ConvertError(f"{gguf_path}: tokenizer {tok_model!r} cannot be exported; "
                               f"supported: gpt2 (byte-level BPE), llama (SentencePiece)")
        out_dir.mkdir(parents=True, exist_ok=True)
        tied = "output.weight" not in f.tensors
        if "rope_freqs.weight" in f.tensors:
            raise ConvertError(f"{gguf_path}: Llama 3 rope scaling (rope_freqs.weight) cannot "
                               f"be exported; supported: models without it")

        def producer(t):
            def produce():
                w = formats.dequantize(t.data, t.type, t.shape)
                kind = t.name.split(".")[-2]
                if kind in ("attn_q", "attn_k"):
                    w = permute_qk(w, n_head if kind == "attn_q" else n_head_kv)
                return w
            return produce

        entries = [(hf_name(t.name), st_dtype if len(t.shape) > 1 else "F32", t.shape,
                    producer(t)) for t in f.tensors.values()]
        _write_weights(out_dir, entries, shards)
        _write_json(out_dir / "config.json", hf_config(md, tied, st_dtype))
        gen = {k: int(md[SPECIAL_KEYS[k]]) for k in ("bos", "eos") if SPECIAL_KEYS[k] in md}
        _write_json(out_dir / "generation_config.json",
                    {f"{k}_token_id": v for k, v in gen.items()})
        if tok_model == "gpt2":
            _write_json(out_dir / "tokenizer.json", bpe_tokenizer_json(md))
        else:
            with atomic_write(out_dir / "tokenizer.model") as fp:
                fp.write(spm_model_proto(md))
        _write_json(out_dir / "tokenizer_config.json", tokenizer_config(md, tok_model == "gpt2"))
    return out_dir


def _write_weights(out_dir: Path, entries: list, shards: int):
    if shards <= 1:
        write_safetensors(out_dir / "model.safetensors", entries, {"format": "pt"})
        return
    # Split into `shards` files of about equal bytes, in tensor order, as HF does.
    sizes = [int(np.prod(e[2])) * (4 if e[1] == "F32" else 2) for e in entries]
    total, groups, acc = sum(sizes), [[] for _ in range(shards)], 0
    for e, size in zip(entries, sizes):
        groups[min(shards - 1, acc * shards // max(1, total))].append(e)
        acc += size
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out_dir / name, group, {"format": "pt"})
        weight_map.update({e[0]: name for e in group})
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj):
    with atomic_write(path, "w", encoding="utf-8") as fp:
        json.dump(obj, fp, ensure_ascii=False, indent=2)
