"""Tiny random-weight GGUF files (llama, or qwen2 / qwen3 / phi3 / gemma3 with arch=) with real tokenizer
vocabularies, for tests.

    make_tiny_llama(path, vocab="gpt2", n_layer=2, n_embd=64, n_head=4, n_head_kv=2,
                    head_dim=None, n_ff=128, tied=True, ftype="f32", seed=0, arch="llama")

writes a valid GGUF v3 (llama.cpp and gguf-py load it). Both vocabulary kinds are
learned, deterministically, from a small built-in corpus by byte-pair merging:
- "gpt2": byte-level BPE (GPT-2's byte-to-unicode alphabet, merges, `pre` = "smollm" as in SmolLM2),
  with ChatML special tokens <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 as in SmolLM2;
- "llama": a SentencePiece BPE vocabulary (<unk>, <s>, </s>, the 256 <0xXX> byte
  fallback pieces, merged pieces with scores, single characters), dummy prefix on.
`vocab_from=PATH` copies every tokenizer.* key of another GGUF instead (e.g. SmolLM2's).
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

import formats
from engine.model import MATRIX_TYPES
from formats import GGMLType

CORPUS = """\
Once upon a time there was a little robot who lived in a small town by the sea. Every
morning the robot walked to the harbour, counted the boats, and wrote the numbers in a
notebook: 3 boats on Monday, 12 on Tuesday, 7 on Wednesday and 42 on Saturday.
The people of the town liked the robot because it was kind and it never forgot a name.
def greet(name):
    return "Hello, " + name + "!"

for i in range(10):
    print(greet("world"), i * 2)
The quick brown fox jumps over the lazy dog. She sells sea shells on the sea shore.
What is the capital of France? The capital of France is Paris. 1 + 1 = 2, 2 + 2 = 4.
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merging over words (tuples of symbols); ties go to the smallest pair
    so the result is deterministic."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] = new.get(tuple(out), 0) + c
        words = new
    return merges


def gpt2_vocab(n_merges: int = 200) -> dict:
    byte_char = _bytes_to_unicode()
    pieces = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+",
                        CORPUS)
    words = Counter(tuple(byte_char[b] for b in p.encode("utf-8")) for p in pieces)
    merges = _learn_merges(words, n_merges)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [byte_char[b] for b in range(256)] + [a + b for a, b in merges]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",  # as SmolLM2 (llama.cpp knows no plain "gpt2")
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] * 3 + [NORMAL] * (len(tokens) - 3),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }


def llama_vocab(n_merges: int = 200) -> dict:
    text = "▁" + CORPUS.replace(" ", "▁").replace("\n", "▁")
    words = Counter(tuple(w) for w in re.findall(r"▁?[^▁]+|▁", text))
    merges = _learn_merges(words, n_merges)
    chars = sorted(set(text))
    tokens = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
              + [a + b for a, b in merges])
    seen = set(tokens)
    chars = [ch for ch in chars if ch not in seen]
    tokens += chars
    n_special = 3 + 256
    # merged pieces score by rank (earlier merge = higher); characters score below all
    scores = [0.0] * n_special + [-float(i) for i in range(len(merges) + len(chars))]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(tokens) - n_special)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": np.asarray(scores, dtype=np.float32),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }


# Like a trained model, the residual stream is mostly the token embedding plus modest
# per-layer updates; fully random unit-gain layers make a chaotic model in which one
# activation-rounding step anywhere moves every later logit by ~1%.
BRANCH_GAIN = 0.3

# name -> weight type, for every type the C engine runs
FTYPES = {t.name.lower(): t for t in MATRIX_TYPES}

# Matrix widths (n_embd, n_head * head_dim, n_ff: every matrix's cols) whole super-blocks
# of 256, for the super-block types (Q2_K .. Q6_K, IQ4_XS)
SUPER_BLOCK_SHAPE = dict(n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512)


def needs_super_blocks(ftype) -> bool:
    """Whether ftype's matrices need widths in whole super-blocks (SUPER_BLOCK_SHAPE)."""
    t = FTYPES[ftype] if isinstance(ftype, str) else GGMLType(ftype)
    return formats.GGML_QUANT_SIZES[t][0] > 32


def encode_tensor(x: np.ndarray, type_: GGMLType) -> np.ndarray:
    if type_ == GGMLType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    return formats.quantize(np.ascontiguousarray(x, dtype=np.float32), type_)


def _file_type(wtype: GGMLType) -> formats.LlamaFileType:
    """general.file_type for a model of all-wtype matrices; Q3_K .. Q5_K name mixes in
    llama.cpp (_S, _M, _L), of which _M stands for them here."""
    mixes = {GGMLType.Q3_K: "MOSTLY_Q3_K_M", GGMLType.Q4_K: "MOSTLY_Q4_K_M", GGMLType.Q5_K: "MOSTLY_Q5_K_M"}
    if wtype in mixes:
        return formats.LlamaFileType[mixes[wtype]]
    return formats.file_type_of(wtype)


def make_tiny_llama(path, *, vocab: str = "gpt2", n_layer: int = 2, n_embd: int = 64,
                    n_head: int = 4, n_head_kv: int = 2, head_dim: int | None = None,
                    n_ff: int = 128, tied: bool = True, ftype="f32", seed: int = 0,
                    n_ctx_train: int = 512, rope_freq_base: float = 10000.0,
                    rms_eps: float = 1e-5, vocab_from=None, rope_dim: int | None = None,
                    rope_scaling_factor: float | None = None,
                    rope_freqs: np.ndarray | None = None, arch: str = "llama",
                    longrope: tuple | None = None, n_swa: int | None = None) -> str:
    """Write a random-weight GGUF of architecture `arch` to path; returns str(path).
    Weights (the matrices and token_embd) are stored in ftype, norms and biases in F32.
    rope_dim < head_dim is partial RoPE; rope_scaling_factor is linear RoPE scaling;
    rope_freqs (rope_dim // 2 floats) is Llama 3.1's per-frequency divisors tensor.
    qwen2 adds Q/K/V biases, qwen3 per-head Q/K norm weights, phi3 fuses Q/K/V into
    attn_qkv and gate/up into ffn_up (engine/arch); longrope = (original context, attention
    factor) adds LongRoPE's short and long factor tensors (phi3); gemma3 adds Q/K norms and
    the norms after attention and after the FFN, and n_swa its sliding window."""
    if vocab_from is not None:
        with formats.read_gguf(vocab_from) as src:
            tok = {k: v for k, v in src.metadata.items() if k.startswith("tokenizer.")}
    elif vocab == "gpt2":
        tok = gpt2_vocab()
    elif vocab == "llama":
        tok = llama_vocab()
    else:
        raise ValueError(f"vocab must be 'gpt2' or 'llama', not {vocab!r}")
    wtype = FTYPES[ftype] if isinstance(ftype, str) else GGMLType(ftype)
    head_dim = head_dim or n_embd // n_head
    n_vocab = len(tok["tokenizer.ggml.tokens"])
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    rng = np.random.default_rng(seed)

    def matrix(rows, cols, std=None):
        return rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(
            std if std is not None else 1.0 / np.sqrt(cols))

    def branch(rows, cols):  # a layer's contribution to the residual stream
        return matrix(rows, cols, BRANCH_GAIN / np.sqrt(cols))

    def norm(n=n_embd):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.5 * rng.standard_normal(n)).astype(np.float32)

    tensors = [("token_embd.weight", (n_vocab, n_embd), matrix(n_vocab, n_embd, 1.0), wtype)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (n_embd,), norm(), GGMLType.F32)]
        if arch == "phi3":
            qkv = q_dim + 2 * kv_dim
            tensors += [(p + "attn_qkv.weight", (qkv, n_embd), matrix(qkv, n_embd), wtype)]
        else:
            tensors += [
                (p + "attn_q.weight", (q_dim, n_embd), matrix(q_dim, n_embd), wtype),
                (p + "attn_k.weight", (kv_dim, n_embd), matrix(kv_dim, n_embd), wtype),
                (p + "attn_v.weight", (kv_dim, n_embd), matrix(kv_dim, n_embd), wtype),
            ]
        if arch == "qwen2":
            tensors += [(p + "attn_q.bias", (q_dim,), bias(q_dim), GGMLType.F32),
                        (p + "attn_k.bias", (kv_dim,), bias(kv_dim), GGMLType.F32),
                        (p + "attn_v.bias", (kv_dim,), bias(kv_dim), GGMLType.F32)]
        if arch in ("qwen3", "gemma3"):
            tensors += [(p + "attn_q_norm.weight", (head_dim,), norm(head_dim), GGMLType.F32),
                        (p + "attn_k_norm.weight", (head_dim,), norm(head_dim), GGMLType.F32)]
        tensors += [
            (p + "attn_output.weight", (n_embd, q_dim), branch(n_embd, q_dim), wtype),
        ]
        if arch == "gemma3":  # a post-norm gain near BRANCH_GAIN keeps the branch modest
            tensors += [(p + "post_attention_norm.weight", (n_embd,),
                         norm() * np.float32(BRANCH_GAIN), GGMLType.F32)]
        tensors += [(p + "ffn_norm.weight", (n_embd,), norm(), GGMLType.F32)]
        if arch == "phi3":
            tensors += [(p + "ffn_up.weight", (2 * n_ff, n_embd), matrix(2 * n_ff, n_embd), wtype)]
        else:
            tensors += [(p + "ffn_gate.weight", (n_ff, n_embd), matrix(n_ff, n_embd), wtype),
                        (p + "ffn_up.weight", (n_ff, n_embd), matrix(n_ff, n_embd), wtype)]
        tensors += [(p + "ffn_down.weight", (n_embd, n_ff), branch(n_embd, n_ff), wtype)]
        if arch == "gemma3":
            tensors += [(p + "post_ffw_norm.weight", (n_embd,),
                         norm() * np.float32(BRANCH_GAIN), GGMLType.F32)]
    tensors.append(("output_norm.weight", (n_embd,), norm(), GGMLType.F32))
    if not tied:
        tensors.append(("output.weight", (n_vocab, n_embd), matrix(n_vocab, n_embd, 0.25), wtype))

    metadata = {
        "general.architecture": arch,
        "general.name": f"tiny-{arch}-{vocab}-{ftype}",
        "general.file_type": int(_file_type(wtype)),
        "general.quantization_version": 2,
        f"{arch}.block_count": n_layer,
        f"{arch}.context_length": n_ctx_train,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.feed_forward_length": n_ff,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.layer_norm_rms_epsilon": float(rms_eps),
        f"{arch}.rope.freq_base": float(rope_freq_base),
        f"{arch}.rope.dimension_count": rope_dim or head_dim,
        f"{arch}.vocab_size": n_vocab,
    }
    if n_swa is not None:
        metadata[f"{arch}.attention.sliding_window"] = int(n_swa)
    if rope_scaling_factor is not None:
        metadata[f"{arch}.rope.scaling.type"] = "linear"
        metadata[f"{arch}.rope.scaling.factor"] = float(rope_scaling_factor)
    if rope_freqs is not None:
        tensors.insert(0, ("rope_freqs.weight", ((rope_dim or head_dim) // 2,),
                           np.asarray(rope_freqs, np.float32), GGMLType.F32))
    if longrope is not None:
        n_ctx_orig, attn_factor = longrope
        metadata[f"{arch}.rope.scaling.original_context_length"] = int(n_ctx_orig)
        metadata[f"{arch}.rope.scaling.attn_factor"] = float(attn_factor)
        half = (rope_dim or head_dim) // 2
        for kind, lo, hi in (("long", 1.0, 8.0), ("short", 0.9, 1.5)):
            tensors.insert(0, (f"rope_factors_{kind}.weight", (half,),
                               rng.uniform(lo, hi, half).astype(np.float32), GGMLType.F32))
    if head_dim != n_embd // n_head:
        metadata[f"{arch}.attention.key_length"] = head_dim
        metadata[f"{arch}.attention.value_length"] = head_dim
    metadata.update(tok)
    formats.write_gguf(path, metadata, [(name, t, shape, encode_tensor(x, t))
                                        for name, shape, x, t in tensors])
    return str(path)


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)), in float64."""
    from engine.perplexity import log_softmax
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=-1).mean())

