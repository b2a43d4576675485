"""A mutation fuzzer for GGUF model files: every mutant of a valid seed must either load
and generate, or be refused with one of kiln's own errors (formats.FormatError,
engine.errors.KilnError) — never a signal, a hang, a foreign exception or a MemoryError
from trusting a size field.

Mutants are made from seeds (tiny models of several block types and architectures, and
optionally the real SmolLM2 file's header) by byte-level mutations guided by a map of the
file's fields (bit flips, insertions, deletions, truncations, counts and lengths set to
extreme values, tensor offsets before, inside and past the data section, value types
changed, token bytes that are not UTF-8) and by semantic ones that rewrite the file with
metadata the engine reads set to the wrong type or to values that disagree with the
tensors. Loads run in long-lived worker processes; a worker that dies or hangs is
replaced and its mutant saved under `crashers` for reproduction
(`python tools/fuzz_gguf.py --replay FILE`).

Used by tests/test_fuzz.py (a CI-sized run) and tools/fuzz_gguf.py (`make fuzz`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import multiprocessing
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path

# --- the field map ------------------------------------------------------------------------

# GGUF value types and the byte widths of the scalar ones (GGUF's specification).
_SCALAR_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class Field:
    pos: int
    width: int  # 4 or 8 (little-endian unsigned)
    kind: str   # n_tensors | n_kv | strlen | arrlen | vtype | etype | ndims | dim | ttype | offset | version


@dataclasses.dataclass
class FieldMap:
    fields: list[Field]
    token_strings: list[tuple[int, int]]  # (pos, len) of each vocabulary token's bytes
    header_end: int                       # where the tensor infos end (before padding)
    data_start: int                       # guess: header_end aligned up to 32


def map_fields(blob: bytes) -> FieldMap:
    """Walk a valid GGUF file and record where each count, type, shape and offset is."""
    fields, tokens = [], []
    p = 0

    def u(width):
        nonlocal p
        v = int.from_bytes(blob[p:p + width], "little")
        p += width
        return v

    def string(record_token=False):
        nonlocal p
        fields.append(Field(p, 8, "strlen"))
        n = u(8)
        if record_token:
            tokens.append((p, n))
        s = blob[p:p + n]
        p += n
        return s

    def value(t, key):
        nonlocal p
        if t == _STRING:
            string()
        elif t == _ARRAY:
            fields.append(Field(p, 4, "etype"))
            et = u(4)
            fields.append(Field(p, 8, "arrlen"))
            n = u(8)
            if et == _STRING:
                for _ in range(n):
                    string(record_token=key == b"tokenizer.ggml.tokens")
            else:
                p += n * _SCALAR_WIDTH[et]
        else:
            p += _SCALAR_WIDTH[t]

    p = 4
    fields.append(Field(p, 4, "version"))
    u(4)
    fields.append(Field(p, 8, "n_tensors"))
    n_tensors = u(8)
    fields.append(Field(p, 8, "n_kv"))
    n_kv = u(8)
    for _ in range(n_kv):
        key = string()
        fields.append(Field(p, 4, "vtype"))
        value(u(4), key)
    for _ in range(n_tensors):
        string()
        fields.append(Field(p, 4, "ndims"))
        nd = u(4)
        for _ in range(nd):
            fields.append(Field(p, 8, "dim"))
            u(8)
        fields.append(Field(p, 4, "ttype"))
        u(4)
        fields.append(Field(p, 8, "offset"))
        u(8)
    return FieldMap(fields, tokens, p, p + (-p % 32))


# --- mutations ------------------------------------------------------------------------------

def _extremes(width: int, old: int) -> list[int]:
    top = (1 << (8 * width)) - 1
    vals = [0, 1, old + 1, max(old - 1, 0), old * 2, 2**31 - 1, 2**31, 2**32 - 1, top, top - 31]
    if width == 8:
        vals += [2**32, 2**40, 2**63 - 1, 2**63]
    return [v & top for v in vals]


def _set(b: bytearray, f: Field, v: int) -> None:
    b[f.pos:f.pos + f.width] = (v & ((1 << (8 * f.width)) - 1)).to_bytes(f.width, "little")


def _where(rng: random.Random, b, fm: FieldMap) -> int:
    """A position, mostly in the header (where a mutation changes meaning, not weights)."""
    limit = fm.header_end if rng.random() < 0.8 else len(b)
    return rng.randrange(max(1, min(limit, len(b))))


def m_bitflip(rng, b, fm):
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        i = _where(rng, b, fm)
        b[i] ^= 1 << rng.randrange(8)
    return "bitflip"


def m_insert(rng, b, fm):
    i = _where(rng, b, fm)
    b[i:i] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4, 8, 16))))
    return "insert"


def m_delete(rng, b, fm):
    i = _where(rng, b, fm)
    del b[i:i + rng.choice((1, 2, 4, 8, 16))]
    return "delete"


def m_truncate(rng, b, fm):
    del b[_where(rng, b, fm) if rng.random() < 0.7 else rng.randrange(len(b)):]
    return "truncate"


def m_extreme(rng, b, fm):
    f = rng.choice([f for f in fm.fields if f.kind in ("n_tensors", "n_kv", "strlen", "arrlen",
                                                       "ndims", "dim")])
    old = int.from_bytes(b[f.pos:f.pos + f.width], "little")
    _set(b, f, rng.choice(_extremes(f.width, old)))
    return f"extreme:{f.kind}"


def m_offset(rng, b, fm):
    offs = [f for f in fm.fields if f.kind == "offset"]
    f = rng.choice(offs)
    data_len = len(b) - fm.data_start
    old = int.from_bytes(b[f.pos:f.pos + 8], "little")
    other = int.from_bytes(b[rng.choice(offs).pos:][:8], "little")
    v = rng.choice([data_len, data_len - 1, data_len + 32, old + 1, old + 16, other,
                    2**64 - 32, 2**64 - 1, 2**63, old - 32, -old % 2**64])
    _set(b, f, v)
    return "offset"


def m_type(rng, b, fm):
    f = rng.choice([f for f in fm.fields if f.kind in ("vtype", "etype", "ttype")])
    _set(b, f, rng.choice(list(range(0, 42)) + [255, 2**31, 2**32 - 1]))
    return f"type:{f.kind}"


def m_dims(rng, b, fm):
    dims = [f for f in fm.fields if f.kind == "dim"]
    a, c = rng.choice(dims), rng.choice(dims)
    va = int.from_bytes(b[a.pos:a.pos + 8], "little")
    vc = int.from_bytes(b[c.pos:c.pos + 8], "little")
    _set(b, a, vc)
    _set(b, c, va)
    return "dims"


def m_utf8(rng, b, fm):
    if not fm.token_strings:
        return m_bitflip(rng, b, fm)
    for _ in range(rng.choice((1, 1, 3, 20))):
        pos, n = rng.choice(fm.token_strings)
        if n:
            i = pos + rng.randrange(n)
            bad = rng.choice((b"\x80", b"\xff", b"\xc3", b"\xed", b"\xfe"))
            b[i:i + 1] = bad
    return "utf8"


BYTE_MUTATIONS = [m_bitflip, m_insert, m_delete, m_truncate, m_extreme, m_extreme, m_offset,
                  m_type, m_dims, m_utf8]


# Semantic mutations rewrite a seed through formats.write_gguf: metadata the engine reads
# given the wrong type, or values that disagree with the tensors. Each takes (arch,
# metadata, tensors) and changes them in place; tensors are [name, type, shape, data].
def _sem(fn):
    SEMANTIC[fn.__name__.removeprefix("s_")] = fn
    return fn


SEMANTIC = {}


@_sem
def s_block_count_string(a, md, ts):
    md[f"{a}.block_count"] = str(md[f"{a}.block_count"])


@_sem
def s_block_count_float(a, md, ts):
    md[f"{a}.block_count"] = float(md[f"{a}.block_count"]) + 0.5


@_sem
def s_block_count_more(a, md, ts):
    md[f"{a}.block_count"] = int(md[f"{a}.block_count"]) + 1


@_sem
def s_block_count_huge(a, md, ts):
    from formats import GGUFValue
    from formats import GGUFValueType as VT
    md[f"{a}.block_count"] = GGUFValue(2**63, VT.UINT64)


@_sem
def s_embedding_length(a, md, ts):
    md[f"{a}.embedding_length"] = int(md[f"{a}.embedding_length"]) // 2


@_sem
def s_head_count_zero(a, md, ts):
    md[f"{a}.attention.head_count"] = 0


@_sem
def s_head_count_odd(a, md, ts):
    md[f"{a}.attention.head_count"] = 3


@_sem
def s_head_count_kv_more(a, md, ts):
    md[f"{a}.attention.head_count_kv"] = int(md[f"{a}.attention.head_count"]) * 2


@_sem
def s_head_count_array(a, md, ts):
    md[f"{a}.attention.head_count"] = [int(md[f"{a}.attention.head_count"])] * 3


@_sem
def s_context_length_zero(a, md, ts):
    md[f"{a}.context_length"] = 0


@_sem
def s_rope_dims(a, md, ts):
    md[f"{a}.rope.dimension_count"] = 4096


@_sem
def s_rms_eps_string(a, md, ts):
    md[f"{a}.attention.layer_norm_rms_epsilon"] = "1e-5"


@_sem
def s_freq_base_nan(a, md, ts):
    md[f"{a}.rope.freq_base"] = float("nan")


@_sem
def s_arch_unknown(a, md, ts):
    md["general.architecture"] = "mamba"


@_sem
def s_arch_int(a, md, ts):
    md["general.architecture"] = 7


@_sem
def s_tokens_short(a, md, ts):
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"])[:-7]


@_sem
def s_tokens_long(a, md, ts):
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"]) + ["extra1", "extra2"]


@_sem
def s_tokens_ints(a, md, ts):
    md["tokenizer.ggml.tokens"] = list(range(len(md["tokenizer.ggml.tokens"])))


@_sem
def s_tokens_not_utf8(a, md, ts):
    toks = [t.encode("utf-8", "surrogateescape") for t in md["tokenizer.ggml.tokens"]]
    for i in range(0, len(toks), 5):
        toks[i] = toks[i] + b"\xff\xc3"
    md["tokenizer.ggml.tokens"] = toks


@_sem
def s_tokens_empty(a, md, ts):
    md["tokenizer.ggml.tokens"] = [""] * len(md["tokenizer.ggml.tokens"])


@_sem
def s_tokens_duplicate(a, md, ts):
    md["tokenizer.ggml.tokens"] = ["a"] * len(md["tokenizer.ggml.tokens"])


@_sem
def s_scores_short(a, md, ts):
    if "tokenizer.ggml.scores" in md:
        md["tokenizer.ggml.scores"] = list(md["tokenizer.ggml.scores"])[:3]
    else:
        md["tokenizer.ggml.scores"] = [0.0]


@_sem
def s_token_type_short(a, md, ts):
    md["tokenizer.ggml.token_type"] = [1, 1]


@_sem
def s_token_type_wild(a, md, ts):
    md["tokenizer.ggml.token_type"] = [99] * len(md["tokenizer.ggml.tokens"])


@_sem
def s_merges_garbage(a, md, ts):
    md["tokenizer.ggml.merges"] = ["nospace", "a b c", " ", "\udcff \udcfe", "zz qq"]


@_sem
def s_tokenizer_model(a, md, ts):
    md["tokenizer.ggml.model"] = "unigram-of-the-future"


@_sem
def s_bos_out_of_range(a, md, ts):
    md["tokenizer.ggml.bos_token_id"] = len(md["tokenizer.ggml.tokens"]) + 5


@_sem
def s_eos_negative(a, md, ts):
    from formats import GGUFValue
    from formats import GGUFValueType as VT
    md["tokenizer.ggml.eos_token_id"] = GGUFValue(-1, VT.INT32)


@_sem
def s_drop_key(a, md, ts):
    del md[f"{a}.attention.head_count"]


@_sem
def s_drop_tokens(a, md, ts):
    del md["tokenizer.ggml.tokens"]


@_sem
def s_drop_tensor(a, md, ts):
    del ts[len(ts) // 2]


@_sem
def s_rename_tensor(a, md, ts):
    ts[1][0] = "blk.99.attn_q.weight"


@_sem
def s_reshape_tensor(a, md, ts):
    """A matrix whose shape has the same element count but other rows and columns."""
    import formats
    for t in ts:
        if len(t[2]) == 2 and t[1] in (formats.GGMLType.F32, formats.GGMLType.F16):
            rows, cols = t[2]
            t[2] = (rows * 2, cols // 2)
            t[3] = t[3].reshape(t[2])
            return


@_sem
def s_norm_length(a, md, ts):
    import numpy as np
    for t in ts:
        if t[0] == "output_norm.weight":
            t[2] = (t[2][0] // 2,)
            t[3] = np.ascontiguousarray(t[3][: t[2][0]])


@_sem
def s_alignment_odd(a, md, ts):
    from formats import GGUFValue
    from formats import GGUFValueType as VT
    md["general.alignment"] = GGUFValue(3, VT.UINT32)


@_sem
def s_alignment_zero(a, md, ts):
    from formats import GGUFValue
    from formats import GGUFValueType as VT
    md["general.alignment"] = GGUFValue(0, VT.UINT32)


@_sem
def s_sliding_window_zero(a, md, ts):
    md[f"{a}.attention.sliding_window"] = 0


@_sem
def s_chat_template_hostile(a, md, ts):
    md["tokenizer.chat_template"] = ("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                                     "{% for x in range(10**12) %}{% endfor %}")


def semantic_variant(seed: Path, name: str, out: Path) -> bool:
    """Write seed rewritten by SEMANTIC[name] to out; False where it does not apply (or
    the writer itself refuses the change, as it should for some)."""
    import formats
    with formats.read_gguf(seed) as f:
        md = f.metadata.copy()
        ts = [[t.name, t.type, tuple(t.shape), t.data.copy()] for t in f.tensors.values()]
    arch = md["general.architecture"]
    try:
        SEMANTIC[name](arch, md, ts)
        formats.write_gguf(out, md, [tuple(t) for t in ts])
    except (KeyError, IndexError, ValueError, TypeError, formats.FormatError, RuntimeError):
        return False
    return True


# --- seeds ----------------------------------------------------------------------------------

# (file name, make_tiny_llama keyword arguments): every architecture, both tokenizer
# families, the float types and the block types with 32- and 256-wide blocks.
SEED_MODELS = [
    ("llama-f32-bpe", dict(arch="llama", ftype="f32")),
    ("llama-q4_0-spm", dict(arch="llama", ftype="q4_0", vocab="llama")),
    ("llama-q8_0-bpe-untied", dict(arch="llama", ftype="q8_0", tied=False)),
    ("llama-f16-spm", dict(arch="llama", ftype="f16", vocab="llama", n_layer=1)),
    ("llama-q4_k", dict(arch="llama", ftype="q4_k", n_layer=1, n_embd=256, n_head=4, n_head_kv=2,
                        head_dim=64, n_ff=256)),
    ("llama-q6_k-spm", dict(arch="llama", ftype="q6_k", vocab="llama", n_layer=1, n_embd=256,
                            n_head=4, n_head_kv=2, head_dim=64, n_ff=256)),
    ("qwen2-q8_0", dict(arch="qwen2", ftype="q8_0")),
    ("qwen3-bf16", dict(arch="qwen3", ftype="bf16")),
    ("phi3-q4_1-spm", dict(arch="phi3", ftype="q4_1", vocab="llama")),
    ("gemma3-q5_0-spm", dict(arch="gemma3", ftype="q5_0", vocab="llama", n_swa=8)),
]


def make_seeds(directory: Path, smollm2: str | None = None) -> list[Path]:
    """Write the seed models into directory (once; they are deterministic). smollm2: the
    real SmolLM2 file, whose header (metadata, the 49k-token vocabulary and merges, the
    tensor infos) becomes a seed with the weights cut to a little of each tensor's data."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_tiny_llama
    directory.mkdir(parents=True, exist_ok=True)
    seeds = []
    for name, kw in SEED_MODELS:
        p = directory / f"{name}.gguf"
        if not p.exists():
            make_tiny_llama(p, seed=1, n_ctx_train=128, **kw)
        seeds.append(p)
    if smollm2:
        # Its real 49k-token vocabulary, merges and chat template on tiny weights, so that
        # mutants reach the tokenizer with the tables users' files have...
        p = directory / "smollm2-vocab.gguf"
        if not p.exists():
            make_tiny_llama(p, seed=1, n_ctx_train=128, ftype="q8_0", n_layer=1,
                            vocab_from=smollm2)
        seeds.append(p)
        # ...and its header as it is (metadata, tensor infos of 30 layers), with the
        # weights cut to a little of the data section: reader-level mutants.
        p = directory / "smollm2-header.gguf"
        if not p.exists():
            blob = Path(smollm2).read_bytes()
            fm = map_fields(blob)
            tmp = p.with_suffix(".tmp")
            tmp.write_bytes(blob[:fm.data_start + 4096])
            os.replace(tmp, p)
        seeds.append(p)
    return seeds


# --- outcomes -------------------------------------------------------------------------------

OK_OUTCOMES = ("loaded", "refused")
# Under `make test-asan` (AddressSanitizer's shadow memory is a vast address-space
# reservation, which an address-space limit would break).
SANITIZED = os.environ.get("KILN_SANITIZED") == "1"
FAIL_OUTCOMES = ("signal", "hang", "foreign")


def load_and_generate(path: str) -> str:
    """The default target: open the file as a user would and ask for two tokens."""
    from engine import LLM
    with LLM(path, n_ctx=64, n_threads=1) as llm:
        llm.generate("Hello world", max_tokens=2, temperature=0)
    return "loaded"


def _worker(conn, target_name: str, mem_limit: int | None) -> None:
    # A size field the loader trusted would show here as a MemoryError, not as the whole
    # machine swapping. (Not under AddressSanitizer, whose shadow memory is a vast
    # reservation of address space.)
    if mem_limit:
        resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    mod, _, fn = target_name.rpartition(":")
    sys.path.insert(0, str(Path(__file__).parent))
    target = getattr(__import__(mod, fromlist=[fn]), fn)
    import formats
    from engine.errors import KilnError
    conn.send("ready")
    while True:
        path = conn.recv()
        if path is None:
            return
        t0 = time.perf_counter()
        try:
            result = (target(path), "")
        except (formats.FormatError, KilnError) as e:
            result = ("refused", f"{type(e).__name__}: {str(e)[:300]}")
        except Exception as e:  # noqa: BLE001 — the point: anything else is a finding
            tb = traceback.format_exc(limit=-3)
            result = ("foreign", f"{type(e).__name__}: {str(e)[:300]}\n{tb}")
        conn.send((*result, time.perf_counter() - t0))


class _Worker:
    def __init__(self, ctx, target, mem_limit):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, target, mem_limit), daemon=True)
        self.proc.start()
        child.close()
        try:
            ready = self.conn.poll(120) and self.conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            self.proc.join(5)
            raise RuntimeError(f"a fuzz worker did not start (exit status {self.proc.exitcode})")
        self.job = None
        self.started = 0.0

    def kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.join(5)
        self.conn.close()


@dataclasses.dataclass
class Report:
    n: int = 0
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    errors: Counter = dataclasses.field(default_factory=Counter)      # refusals by error class
    kinds: Counter = dataclasses.field(default_factory=Counter)       # mutants by mutation
    failures: list = dataclasses.field(default_factory=list)          # (outcome, detail, saved path)
    longest: tuple = (0.0, "")                                        # (seconds, mutant)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.n} mutants in {self.seconds:.0f} s: "
                 + ", ".join(f"{k} {self.outcomes[k]}" for k in OK_OUTCOMES + FAIL_OUTCOMES),
                 "refused by: " + ", ".join(f"{k} {v}" for k, v in self.errors.most_common()),
                 f"longest single load: {self.longest[0] * 1000:.0f} ms ({self.longest[1]})",
                 "mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))]
        for outcome, detail, saved in self.failures[:20]:
            lines.append(f"FAILURE {outcome}: {detail.splitlines()[0] if detail else ''} -> {saved}")
        return "\n".join(lines)


# Seeds made from the real SmolLM2 file take 0.1-0.6 s a load (its 49k-token tokenizer)
# where a tiny model takes a few ms: they get this share of a tiny seed's mutants, and of
# the semantic mutations only those aimed at the tokenizer.
SMOLLM2_WEIGHT = 0.25
TOKENIZER_SEMANTIC = tuple(n for n in SEMANTIC if n.startswith(("token", "scores", "merges", "bos",
                                                                "eos", "drop_tokens")))


def mutants(seeds: list[Path], n: int, rng: random.Random, workdir: Path):
    """Yield (description, bytes) for n mutants of the seeds."""
    blobs = {s: s.read_bytes() for s in seeds}
    maps = {s: map_fields(b) for s, b in blobs.items()}
    weights = [SMOLLM2_WEIGHT if s.stem.startswith("smollm2") else 1.0 for s in seeds]
    semdir = workdir / "semantic"
    semdir.mkdir(parents=True, exist_ok=True)
    choices = [(s, name) for s in seeds if not s.stem.endswith("header")
               for name in (TOKENIZER_SEMANTIC if s.stem.startswith("smollm2") else SEMANTIC)]
    variants = {}  # (seed, name) -> (bytes, FieldMap), or None where it does not apply; made on first use
    for _ in range(n):
        s = rng.choices(seeds, weights)[0]
        if rng.random() < 0.2:
            key = rng.choice([c for c in choices if c[0] == s] or choices)
            if key not in variants:
                out = semdir / f"{key[0].stem}.{key[1]}.gguf"
                variants[key] = None
                if semantic_variant(key[0], key[1], out):
                    blob = out.read_bytes()
                    variants[key] = (blob, map_fields(blob))
                    out.unlink()
            if variants[key] is not None:
                blob, fm = variants[key]
                b = bytearray(blob)
                desc = [f"semantic:{key[1]}"]
                if rng.random() < 0.3:
                    desc.append(rng.choice(BYTE_MUTATIONS)(rng, b, fm))
                yield f"{key[0].stem} " + "+".join(desc), bytes(b)
                continue
        b = bytearray(blobs[s])
        desc = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            desc.append(rng.choice(BYTE_MUTATIONS)(rng, b, maps[s]))
            if len(b) < 24:
                break
        yield f"{s.stem} " + "+".join(desc), bytes(b)


def run(seeds: list[Path], n: int, *, workdir: Path, crashers: Path, rng_seed: int = 0,
        workers: int = 2, timeout: float = 20.0, target: str = "gguf_fuzz:load_and_generate",
        mem_limit: int | None = None if SANITIZED else 4 << 30, extra: list[tuple[str, bytes]] = (), progress: bool = False,
        max_seconds: float | None = None) -> Report:
    """Load n mutants of seeds (and the `extra` (description, bytes) ones) in worker
    processes running `target` ("module:function", importable from tests/); return the
    Report. A worker whose mutant kills it or runs past `timeout` is replaced and the
    mutant saved in crashers/ with a .txt saying what happened."""
    ctx = multiprocessing.get_context("spawn")
    report = Report()
    work = itertools.chain(extra, mutants(seeds, n, random.Random(rng_seed), workdir))  # lazily
    pool = [_Worker(ctx, target, mem_limit) for _ in range(workers)]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n + len(extra), unit="mutant")
    t0 = time.perf_counter()
    done = False

    def record(w, outcome, detail, seconds):
        desc, blob, path = w.job
        w.job = None
        report.n += 1
        report.outcomes[outcome] += 1
        for k in desc.split(" ", 1)[1].split("+"):
            report.kinds[k.split(":")[0] if not k.startswith("semantic") else "semantic"] += 1
        if outcome == "refused":
            report.errors[detail.split(":")[0]] += 1
        if seconds > report.longest[0] and outcome in OK_OUTCOMES:
            report.longest = (seconds, desc)
        if outcome in FAIL_OUTCOMES:
            crashers.mkdir(parents=True, exist_ok=True)
            name = f"{outcome}-{hashlib.sha1(blob).hexdigest()[:12]}"
            (crashers / f"{name}.gguf").write_bytes(blob)
            (crashers / f"{name}.txt").write_text(f"{desc}\n{outcome}: {detail}\n")
            report.failures.append((outcome, f"{desc}: {detail}", str(crashers / f"{name}.gguf")))
        os.unlink(path)
        if bar:
            bar.update()

    try:
        while True:
            for i, w in enumerate(pool):
                if w.job is None and not done:
                    if max_seconds and time.perf_counter() - t0 > max_seconds:
                        done = True
                        break
                    item = next(work, None)
                    if item is None:
                        done = True
                        break
                    desc, blob = item
                    fd, path = tempfile.mkstemp(suffix=".gguf", dir=workdir)
                    with os.fdopen(fd, "wb") as fh:
                        fh.write(blob)
                    w.job, w.started = (desc, blob, path), time.perf_counter()
                    w.conn.send(path)
            busy = [w for w in pool if w.job is not None]
            if not busy:
                break
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], timeout=0.5)
            now = time.perf_counter()
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        outcome, detail, seconds = w.conn.recv()
                        record(w, outcome, detail, seconds)
                        continue
                    except (EOFError, OSError):
                        pass
                if w.proc.sentinel in ready or not w.proc.is_alive():
                    w.proc.join(5)
                    code = w.proc.exitcode
                    sig = -code if code is not None and code < 0 else None
                    detail = (f"killed by {signal.Signals(sig).name}" if sig
                              else f"worker exited with status {code}")
                    record(w, "signal", detail, now - w.started)
                    w.kill()
                    pool[i] = _Worker(ctx, target, mem_limit)
                elif now - w.started > timeout:
                    record(w, "hang", f"no answer in {timeout:.0f} s", now - w.started)
                    w.kill()
                    pool[i] = _Worker(ctx, target, mem_limit)
    finally:
        for w in pool:
            if w.job is None:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            w.kill()
        if bar:
            bar.close()
    report.seconds = time.perf_counter() - t0
    return report
