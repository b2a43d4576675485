"""`kiln info`: what is inside a GGUF model file, and which kernels would run it.

Reads only the header (metadata and tensor table) through the memory map, so it is fast
on any size of model and works on files kiln cannot run (an unsupported architecture is
reported, not refused).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import formats

# Hyperparameters under `{arch}.`, in the order llama.cpp's loader prints them.
HPARAM_KEYS = (
    ("context_length", "n_ctx_train"),
    ("embedding_length", "n_embd"),
    ("block_count", "n_layer"),
    ("feed_forward_length", "n_ff"),
    ("attention.head_count", "n_head"),
    ("attention.head_count_kv", "n_head_kv"),
    ("attention.key_length", "head_dim"),
    ("rope.dimension_count", "n_rot"),
    ("attention.sliding_window", "n_swa"),
    ("rope.freq_base", "rope_freq_base"),
    ("attention.layer_norm_rms_epsilon", "rms_eps"),
    ("vocab_size", "n_vocab"),
)

TOKENIZER_KINDS = {"gpt2": "byte-level BPE", "llama": "SentencePiece"}


def _isa() -> dict:
    """The kernel ISA variant kiln would use here (KILN_ISA may force one)."""
    try:
        import ckernels
        return {"active": ckernels.active_isa(), "supported": list(ckernels.supported_isas())}
    except Exception as e:  # noqa: BLE001 - a forced ISA the CPU lacks is reported, not fatal
        return {"active": None, "error": str(e)}


def model_info(path) -> dict:
    """A JSON-ready description of the model file at `path`."""
    path = Path(path)
    with formats.read_gguf(path) as f:
        md = f.metadata
        arch = md.get("general.architecture")
        hparams = {}
        for key, name in HPARAM_KEYS:
            value = md.get(f"{arch}.{key}")
            if value is not None:
                hparams[name] = value
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if tokens is not None else None
        if "n_vocab" not in hparams and n_vocab is not None:
            hparams["n_vocab"] = n_vocab
        if "head_dim" not in hparams and hparams.get("n_head"):
            hparams["head_dim"] = hparams["n_embd"] // hparams["n_head"]
        tok_model = md.get("tokenizer.ggml.model")
        tokenizer = {
            "model": tok_model,
            "kind": TOKENIZER_KINDS.get(tok_model, "unknown"),
            "pre": md.get("tokenizer.ggml.pre"),
            "n_tokens": n_vocab,
            "n_merges": len(md["tokenizer.ggml.merges"]) if "tokenizer.ggml.merges" in md else None,
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
            "add_bos_token": md.get("tokenizer.ggml.add_bos_token"),
        }
        template = md.get("tokenizer.chat_template")
        by_type: Counter = Counter()
        n_params = 0
        tensor_bytes = 0
        for t in f.tensors.values():
            by_type[_type_name(t.type)] += 1
            n = 1
            for d in t.shape:
                n *= int(d)
            n_params += n
            tensor_bytes += int(t.nbytes)
    file_size = os.path.getsize(path)
    from engine.chat_template import detect_template
    return {
        "path": str(path),
        "file_size": file_size,
        "name": md.get("general.name"),
        "architecture": arch,
        "file_type": md.get("general.file_type"),
        "file_type_name": file_type_name(md.get("general.file_type")),
        "hparams": hparams,
        "tokenizer": tokenizer,
        "chat_template": (detect_template(template) or "custom") if isinstance(template, str) else None,
        "n_tensors": sum(by_type.values()),
        "tensor_types": dict(sorted(by_type.items())),
        "n_params": n_params,
        "tensor_bytes": tensor_bytes,
        # llama.cpp's "BPW": bytes of tensor data per parameter, in bits.
        "bits_per_weight": round(tensor_bytes * 8 / n_params, 3) if n_params else None,
        "isa": _isa(),
    }


def file_type_name(value) -> str | None:
    """llama.cpp's name of a `general.file_type` (the mix a quantizer was asked for, e.g.
    Q4_K_M), or None when the file has none or one llama.cpp does not define."""
    try:
        ft = formats.LlamaFileType(int(value))
    except (TypeError, ValueError):
        return None
    return "F32" if ft == formats.LlamaFileType.ALL_F32 else ft.name.removeprefix("MOSTLY_")


def _type_name(t) -> str:
    return getattr(t, "name", str(t))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def _human_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_info(info: dict) -> str:
    """The human-readable report of `kiln info`."""
    lines = [f"file:          {info['path']}",
             f"size:          {_human_bytes(info['file_size'])} ({info['file_size']:,} bytes)",
             f"name:          {info['name']}",
             f"architecture:  {info['architecture']}"]
    for name, value in info["hparams"].items():
        shown = f"{value:g}" if isinstance(value, float) else value
        lines.append(f"  {name + ':':<16} {shown}")
    tok = info["tokenizer"]
    lines.append(f"tokenizer:     {tok['model']} ({tok['kind']}), {tok['n_tokens']} tokens"
                 + (f", {tok['n_merges']} merges" if tok["n_merges"] is not None else "")
                 + (f", pre={tok['pre']}" if tok["pre"] else ""))
    lines.append(f"  bos/eos:      {tok['bos_token_id']} / {tok['eos_token_id']}"
                 f" (add_bos={tok['add_bos_token']})")
    lines.append(f"chat template: {info['chat_template'] or 'none (a built-in is used)'}")
    if info["file_type"] is not None:
        lines.append(f"file type:     {info['file_type_name'] or 'unknown'}"
                     f" (general.file_type {info['file_type']})")
    types = ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items())
    lines.append(f"tensors:       {info['n_tensors']} ({types})")
    lines.append(f"parameters:    {_human_count(info['n_params'])} ({info['n_params']:,})")
    lines.append(f"bits/weight:   {info['bits_per_weight']}")
    isa = info["isa"]
    if isa.get("active"):
        lines.append(f"kernel ISA:    {isa['active']} (supported here: {', '.join(isa['supported'])})")
    else:
        lines.append(f"kernel ISA:    unavailable: {isa.get('error')}")
    return "\n".join(lines)


def format_info_json(info: dict) -> str:
    return json.dumps(info, indent=2, default=_json_default)


def _json_default(o):
    # NumPy scalars from the metadata (e.g. np.float32 rope_freq_base).
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")
