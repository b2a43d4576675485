"""Tokenizers of Hugging Face checkpoints as GGUF vocabularies (for `kiln convert`).

SentencePiece `tokenizer.model` is read through its ModelProto (pieces, scores, types);
byte-level BPE `tokenizer.json` gives the vocabulary, merges and added tokens, and the
pre-tokenizer is named the way llama.cpp's convert_hf_to_gguf.py names it: by the hash of
the token ids of a check string, else by the pre-tokenizer's structure. Special token ids
and add_bos/add_eos come from tokenizer_config.json, config.json and
generation_config.json, in the order gguf-py's SpecialVocab reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from engine.errors import ConvertError

# GGUF token types (llama_token_type; the same numbers as SentencePiece's piece types).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = \
    1, 2, 3, 4, 5, 6


def read_json(path: Path, required=True):
    if not path.is_file():
        if required:
            raise ConvertError(f"{path}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


@dataclass
class Vocab:
    model: str                      # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list
    types: list
    scores: list | None = None
    merges: list | None = None
    pre: str | None = None
    add_space_prefix: bool | None = None
    special: dict = field(default_factory=dict)      # "bos" -> id, ...
    add_special: dict = field(default_factory=dict)  # "bos" -> bool
    chat_template: str | None = None


SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad")
SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
                "pad": "tokenizer.ggml.padding_token_id"}


def read_hf_tokenizer(src: Path, n_vocab: int, cfg: dict, arch=None) -> Vocab:
    """The checkpoint's vocabulary; arch (engine/arch) may fix SentencePiece's space
    prefix (gemma3: none, as llama.cpp's converter writes it)."""
    tok_model, tok_json = src / "tokenizer.model", src / "tokenizer.json"
    tok_cfg = read_json(src / "tokenizer_config.json", required=False) or {}
    if tok_model.is_file():
        vocab = read_spm_vocab(tok_model, n_vocab, src, tok_cfg)
        if arch is not None and arch.spm_add_space_prefix is not None:
            vocab.add_space_prefix = arch.spm_add_space_prefix
        added = []
    elif tok_json.is_file():
        tj = read_json(tok_json)
        vocab = read_bpe_vocab(tok_json, tj, n_vocab, tok_cfg)
        added = tj.get("added_tokens") or []
    else:
        raise ConvertError(f"{src}: no tokenizer found; supported: tokenizer.model "
                           f"(SentencePiece) or tokenizer.json (byte-level BPE)")
    _read_special_tokens(vocab, src, tok_cfg, added, cfg, n_vocab)
    return vocab


def _read_special_tokens(vocab: Vocab, src: Path, tok_cfg: dict, added: list, cfg: dict,
                         n_vocab: int):
    """Special ids and add_bos/add_eos, looked up in the order gguf-py's SpecialVocab uses:
    tokenizer_config.json tokens (via tokenizer.json's added tokens), then config.json's
    *_token_id, then generation_config.json; SentencePiece's own ids come last."""
    ids_by_content = {}
    for a in added:
        if isinstance(a, dict) and "content" in a and "id" in a:
            ids_by_content.setdefault(a["content"], a["id"])
    content_ids = {t: i for i, t in enumerate(vocab.tokens)}
    found = {}
    for kind in SPECIAL_KINDS:
        add = tok_cfg.get(f"add_{kind}_token")
        if isinstance(add, bool):
            vocab.add_special[kind] = add
        entry = tok_cfg.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str):
            tid = ids_by_content.get(content, content_ids.get(content))
            if isinstance(tid, int) and 0 <= tid < n_vocab:
                found[kind] = tid
    gen = read_json(src / "generation_config.json", required=False) or {}
    for source in (cfg, gen):
        for kind in SPECIAL_KINDS:
            tid = source.get(f"{kind}_token_id")
            if isinstance(tid, list) and tid:
                tid = tid[0]  # several end tokens: the first is the canonical one
            if isinstance(tid, int) and 0 <= tid < n_vocab and kind not in found:
                found[kind] = tid
    for kind, tid in vocab.special.items():
        found.setdefault(kind, tid)
    vocab.special = found
    tmpl = tok_cfg.get("chat_template")
    if tmpl is None and (src / "chat_template.jinja").is_file():
        tmpl = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(tmpl, list):  # named templates: the default one
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    vocab.chat_template = tmpl if isinstance(tmpl, str) else None


def read_spm_vocab(path: Path, n_vocab: int, src: Path, tok_cfg: dict) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    if len(proto.pieces) == 0:
        raise ConvertError(f"{path}: not a SentencePiece model (no pieces)")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [TOKEN_UNUSED] * n_vocab
    for i, p in enumerate(proto.pieces[:n_vocab]):
        tokens[i], scores[i], types[i] = p.piece, p.score, int(p.type)
    # Tokens added on top of the SentencePiece model (as llama.cpp's converter reads them).
    added = read_json(src / "added_tokens.json", required=False) or {}
    for content, tid in added.items():
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            tokens[tid], scores[tid], types[tid] = content, -1000.0, TOKEN_USER_DEFINED
    for tid, data in (tok_cfg.get("added_tokens_decoder") or {}).items():
        tid = int(tid)
        if 0 <= tid < n_vocab and isinstance(data, dict) and "content" in data:
            content = data["content"]
            special = data.get("special") or _looks_special(content)
            tokens[tid] = content if special else content.replace("\u2581", " ")
            types[tid] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
            scores[tid] = -1000.0
    ts = proto.trainer_spec
    special = {k: v for k, v in (("bos", ts.bos_id), ("eos", ts.eos_id), ("unk", ts.unk_id),
                                 ("pad", ts.pad_id)) if 0 <= v < n_vocab}
    return Vocab("llama", tokens, types, scores=scores, pre="default",
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix), special=special)


def _looks_special(t: str) -> bool:
    # The heuristic llama.cpp's converter applies to added tokens not flagged special.
    return (t.startswith("<|") and t.endswith("|>")) or t in ("<pad>", "<mask>")


# The check string llama.cpp's convert_hf_to_gguf.py tokenizes to identify a BPE
# pre-tokenizer: the SHA-256 of str(token ids) names it.
CHKTXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
          "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
          "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
          "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
          "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
KNOWN_PRE_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Pre-tokenizer regexes of the known kinds, as they appear in tokenizer.json Split steps;
# a tokenizer whose vocabulary is new (so its hash is unknown) is named by its structure.
LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|"
                " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"
               " ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
SUPPORTED_PRE = ("smollm", "llama-bpe", "qwen2", "gpt-2")


def pre_tokenizer_json(pre: str, add_prefix_space: bool = False) -> dict:
    """The tokenizer.json pre_tokenizer of a known kind (used by export_hf and detection)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": add_prefix_space,
                  "trim_offsets": True, "use_regex": True}
    if pre == "smollm":
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    if pre in ("llama-bpe", "qwen2"):
        regex = LLAMA3_REGEX if pre == "llama-bpe" else QWEN2_REGEX
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated",
             "invert": False}, dict(byte_level, use_regex=False)]}
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level
    raise ValueError(f"no pre-tokenizer description for {pre!r}")


def _pre_steps(pt) -> list:
    if not isinstance(pt, dict):
        return []
    if pt.get("type") == "Sequence":
        return [s for s in pt.get("pretokenizers", []) if isinstance(s, dict)]
    return [pt]


def detect_pre(tj: dict, path: Path) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json, as llama.cpp names it."""
    from tokenizers import Tokenizer
    try:
        ids = Tokenizer.from_str(json.dumps(tj)).encode(CHKTXT).ids
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ConvertError(f"{path}: the tokenizers library cannot load it ({e})") from None
    chkhsh = sha256(str(ids).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[chkhsh]
    steps = _pre_steps(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == LLAMA3_REGEX:
            return "llama-bpe"
        if regex == QWEN2_REGEX:
            return "qwen2"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    raise ConvertError(f"{path}: unrecognized BPE pre-tokenizer (check hash {chkhsh[:16]}); "
                       f"supported: {', '.join(SUPPORTED_PRE)}")


def read_bpe_vocab(path: Path, tj: dict, n_vocab: int, tok_cfg: dict) -> Vocab:
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: tokenizer model type {model.get('type')!r} is not "
                           f"supported; supported: byte-level BPE (tokenizer.json) or "
                           f"SentencePiece (tokenizer.model)")
    steps = _pre_steps(tj.get("pre_tokenizer"))
    if not any(s.get("type") == "ByteLevel" for s in steps):
        raise ConvertError(f"{path}: BPE tokenizer is not byte-level; supported: byte-level "
                           f"BPE (tokenizer.json) or SentencePiece (tokenizer.model)")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TOKEN_UNUSED] * n_vocab
    for tok, tid in (model.get("vocab") or {}).items():
        if 0 <= tid < n_vocab:
            tokens[tid], types[tid] = tok, TOKEN_NORMAL
    for a in tj.get("added_tokens") or []:
        tid = a.get("id")
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special = a.get("special") or _looks_special(a["content"])
            tokens[tid] = a["content"]
            types[tid] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    merges = []
    for m in model.get("merges") or []:
        if isinstance(m, str):
            merges.append(m)
        else:
            # pair format (transformers >= 4.45); a space inside a part is written as
            # U+0120 as gguf-py does, so the "a b" string stays splittable
            merges.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part)
                                   for part in m))
    add_prefix = next((bool(s.get("add_prefix_space")) for s in steps
                       if s.get("type") == "ByteLevel"), False)
    vocab = Vocab("gpt2", tokens, types, merges=merges, pre=detect_pre(tj, path),
                  add_space_prefix=add_prefix)
    # BOS added by a TemplateProcessing post-processor (tokenizer_config's flag wins).
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            vocab.add_special["bos"] = bool(single) and "SpecialToken" in single[0]
    return vocab
