"""A GGUF of a family in engine/arch run by the C forward pass (ckernels/src/forward.c).

Model(path) memory-maps the file, checks every tensor the forward pass will read
(presence, shape, type) against the config, and hands the C engine pointers into the
map: weights are never copied. `eval` is one C call however many tokens it gets.
"""
from __future__ import annotations

import os
import threading
import warnings

import numpy as np

import ckernels
import formats
from formats import GGMLType

from .config import ModelConfig
from .errors import CacheRewindError, ContextOverflowError, ModelError

# Types kiln_matmul multiplies (and codecs.c dequantizes, for embedding rows): the
# weight types of the C type table.
MATRIX_TYPES = tuple(GGMLType(b.ggml_id) for b in ckernels.weight_types())
N_BATCH = 512  # prompt tokens per internal chunk: bounds the activation buffers
ROPE_NORM, ROPE_NEOX = 0, 2  # forward.h's kiln_rope_type (ggml's rope modes)
FFN_SILU, FFN_GELU = 0, 1  # forward.h's kiln_ffn_act


# Weight types the kernels repack at load time (kernels.h: they never read the file's
# blocks again after kiln_matrix_init). A tied token_embd's rows are looked up in the
# output's packed copy (forward.c), so its pages are not read again either; an untied
# one's rows are read from the file, one per token: those few pages fault back in.
REPACKED_TYPES = tuple(GGMLType(b.ggml_id) for b in ckernels.weight_types() if b.repacked)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may run on: hyper-threads share a core's matmul
    units, so llama.cpp's default of one thread per core is faster than one per CPU."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            with open(base + "core_id") as a, open(base + "physical_package_id") as b:
                cores.add((a.read().strip(), b.read().strip()))
        except OSError:
            return len(cpus) or os.cpu_count() or 1
    return len(cores) or len(cpus)


# The per-layer F32 vectors of the variations (engine/arch), as forward.h names them:
# GGUF tensor blk.N.<name> -> the layer weights' field.
LAYER_VECTORS = {"attn_q.bias": "attn_q_bias", "attn_k.bias": "attn_k_bias",
                 "attn_v.bias": "attn_v_bias", "attn_q_norm.weight": "attn_q_norm",
                 "attn_k_norm.weight": "attn_k_norm",
                 "post_attention_norm.weight": "attn_post_norm",
                 "post_ffw_norm.weight": "ffn_post_norm"}


def kv_cache_bytes(c: ModelConfig, n_ctx: int, n_seq: int, n_batch: int = N_BATCH) -> int:
    """Bytes of the KV cache forward.c's plan_cache lays out, known before anything is
    allocated (Model.kv_cache_bytes reports the allocation itself; a test ties the two):
    fp16 keys and values of each layer's KV heads per sequence, for n_ctx positions or, on
    a sliding-window layer, a mirrored ring of 2 (n_swa - 1 + n_batch) where that is
    smaller; key rows rounded up to the attention block, plus one on a ring."""
    block, kv_dim = 16, c.n_head_kv * c.head_dim  # KILN_ATT_BLOCK
    n_batch = min(int(n_batch), int(n_ctx))
    total = 0
    for layer in range(c.n_layer):
        swa = bool(c.swa_layers[layer])
        rows = int(n_ctx)
        if swa and 2 * (c.n_swa - 1 + n_batch) <= rows:
            rows = 2 * (c.n_swa - 1 + n_batch)
        key_rows = -(-(rows + (block if swa else 0)) // block) * block
        total += 2 * kv_dim * (key_rows + rows)
    return total * int(n_seq)


def physical_memory() -> int | None:
    """Bytes of RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_context(c: ModelConfig, n_ctx: int, n_seq: int, n_batch: int = N_BATCH) -> None:
    """Refuses, before anything is allocated, a context whose KV cache cannot fit in this
    machine's memory; warns about one longer than the model was trained for (allowed, as
    llama.cpp allows it: quality degrades past it)."""
    need, ram = kv_cache_bytes(c, n_ctx, n_seq, n_batch), physical_memory()
    if ram is not None and need > ram:
        raise ModelError(f"n_ctx={n_ctx} needs a KV cache of {need / 2**30:.1f} GiB"
                         f"{f' for {n_seq} sequences' if n_seq > 1 else ''}, more than this "
                         f"machine's {ram / 2**30:.1f} GiB of memory (the model was trained "
                         f"for {c.n_ctx_train} tokens)")
    if n_ctx > c.n_ctx_train:
        warnings.warn(f"n_ctx={n_ctx} is longer than the {c.n_ctx_train} tokens the model was "
                      f"trained for: text past that may degrade", stacklevel=3)


def expected_tensors(c: ModelConfig) -> dict:
    """name -> (NumPy shape, allowed types) of every tensor the forward pass reads, as the
    config's architecture declares them."""
    return {name: (shape, MATRIX_TYPES if matrix else (GGMLType.F32,))
            for name, (shape, matrix) in c.arch.tensor_shapes(c).items()}


def check_tensors(tensors, c: ModelConfig) -> None:
    """Raise ModelError naming the first tensor that is missing or does not fit."""
    for name, (shape, types) in expected_tensors(c).items():
        t = tensors.get(name)
        if t is None:
            raise ModelError(f"model file lacks tensor '{name}'")
        if tuple(t.shape) != shape:
            raise ModelError(f"tensor '{name}' has shape {tuple(t.shape)}, the config "
                             f"needs {shape}")
        try:
            ttype = GGMLType(t.type)
        except ValueError:
            ttype = t.type
        if ttype not in types:
            raise ModelError(f"tensor '{name}' has type {getattr(ttype, 'name', ttype)}, "
                             f"kiln supports {', '.join(x.name for x in types)} here")
        block, type_size = formats.GGML_QUANT_SIZES[ttype]
        if shape[-1] % block:
            raise ModelError(f"tensor '{name}' has rows of {shape[-1]} elements, not a "
                             f"multiple of the {ttype.name} block of {block}")
        if t.nbytes != np.prod(shape[:-1], dtype=np.int64) * (shape[-1] // block) * type_size:
            raise ModelError(f"tensor '{name}' holds {t.nbytes} bytes, not what its shape "
                             f"and type need")
    for name in ROPE_FACTOR_TENSORS:
        if name not in tensors:
            continue
        t = tensors[name]
        if tuple(t.shape) != (c.rope_dim // 2,) or t.type != GGMLType.F32:
            raise ModelError(f"tensor '{name}' has shape {tuple(t.shape)}, "
                             f"type {t.type}; the config needs F32 ({c.rope_dim // 2},)")


# RoPE frequency factors (one divisor per rotated pair): Llama 3.1's, LongRoPE's two sets
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_short.weight",
                       "rope_factors_long.weight")


def rope_freq_factors(tensors, c: ModelConfig, n_ctx: int):
    """The factors RoPE divides by at a context of n_ctx (ModelConfig.rope_factors_name),
    as float32, or None."""
    name = c.rope_factors_name(tensors.keys(), n_ctx)
    return None if name is None else np.asarray(tensors[name].data, np.float32).reshape(-1)


def layer_matrix_rows(c: ModelConfig) -> dict:
    """forward.h's layer matrix fields -> (GGUF tensor in blk.N., first row, rows): the
    fused tensors of phi3 give the kernels row ranges of one matrix (Q, K, V of
    attn_qkv; gate, up of ffn_up), the others their own tensor whole."""
    q, kv, ff = c.n_embd_q, c.n_embd_kv, c.n_ff
    rows = {"attn_output": ("attn_output", 0, c.n_embd), "ffn_down": ("ffn_down", 0, c.n_embd)}
    if c.attn_qkv_fused:
        rows.update(attn_q=("attn_qkv", 0, q), attn_k=("attn_qkv", q, kv),
                    attn_v=("attn_qkv", q + kv, kv))
    else:
        rows.update(attn_q=("attn_q", 0, q), attn_k=("attn_k", 0, kv), attn_v=("attn_v", 0, kv))
    if c.ffn_gate_up_fused:
        rows.update(ffn_gate=("ffn_up", 0, ff), ffn_up=("ffn_up", ff, ff))
    else:
        rows.update(ffn_gate=("ffn_gate", 0, ff), ffn_up=("ffn_up", 0, ff))
    return rows


class Model:
    """A model ready to evaluate tokens: `.eval(tokens, n_past)` -> logits."""

    def __init__(self, path, n_ctx: int = 2048, n_threads: int | None = None,
                 n_batch: int = N_BATCH, n_seq: int = 1):
        """n_threads None = physical cores (at most ckernels.MAX_THREADS); n_batch =
        prompt tokens per internal chunk (an eval of more tokens is still one call);
        n_seq = sequences, each with its own KV cache of n_ctx positions (eval runs
        sequence 0; eval_batch any of them)."""
        from ckernels._ext import ModelForward

        if n_threads is None:
            n_threads = min(physical_cores(), ckernels.MAX_THREADS)
        if int(n_ctx) < 1 or int(n_threads) < 1 or int(n_batch) < 1 or int(n_seq) < 1:
            raise ValueError(f"n_ctx ({n_ctx}), n_threads ({n_threads}), n_batch "
                             f"({n_batch}) and n_seq ({n_seq}) must be >= 1")
        if int(n_threads) > ckernels.MAX_THREADS:
            raise ValueError(f"n_threads ({n_threads}) is above the thread pool's limit of "
                             f"{ckernels.MAX_THREADS}")
        cpus = usable_cpus()
        if int(n_threads) > cpus:
            warnings.warn(f"n_threads={n_threads} is more than the {cpus} CPUs this process can "
                          "run on: the extra threads wait for a CPU, which slows every step "
                          "(the results are the same)", stacklevel=3)
        self.path = str(path)
        self._file = formats.read_gguf(path)  # the mmap the C engine reads: kept open
        try:
            tensors = self._file.tensors
            self.metadata = self._file.metadata
            self.config = c = ModelConfig.from_metadata(self.metadata, tensors.keys())
            check_tensors(tensors, c)
            expected = expected_tensors(c)
            self.n_ctx, self.n_threads, self.n_seq = int(n_ctx), int(n_threads), int(n_seq)
            check_context(c, self.n_ctx, self.n_seq, n_batch)

            def weight(name, first_row=0):
                t = tensors[name]
                data = np.asarray(t.data)
                if not data.flags.c_contiguous:
                    raise ModelError(f"tensor '{name}' is not contiguous in the file")
                # rows of whole blocks are contiguous: a row range is a pointer offset
                row_bytes = t.nbytes // int(np.prod(t.shape[:-1], dtype=np.int64))
                return (int(t.type), data.ctypes.data + first_row * row_bytes)

            def vector(name):
                v = np.ascontiguousarray(tensors[name].data, dtype=np.float32)
                self._keep.append(v)
                return v.ctypes.data

            self._keep = []
            self._lock = threading.Lock()  # the C call releases the GIL; one eval at a time
            layers = [{
                "attn_norm": vector(f"blk.{i}.attn_norm.weight"),
                "ffn_norm": vector(f"blk.{i}.ffn_norm.weight"),
                **{field: weight(f"blk.{i}.{name}.weight", first) for field, (name, first, _)
                   in layer_matrix_rows(c).items()},
                **{field: vector(f"blk.{i}.{name}") for name, field in LAYER_VECTORS.items()
                   if f"blk.{i}.{name}" in expected},
            } for i in range(c.n_layer)]
            freq_factors = rope_freq_factors(tensors, c, self.n_ctx)
            self._inv_freq = np.ascontiguousarray(c.rope_inv_freq(freq_factors), np.float64)
            self._inv_freq_swa = np.ascontiguousarray(c.rope_inv_freq_swa(), np.float64)
            cfg = {k: getattr(c, k) for k in ("n_vocab", "n_embd", "n_layer", "n_head",
                                              "n_head_kv", "head_dim", "n_ff", "rope_dim",
                                              "rms_eps")}
            self._n_batch = min(int(n_batch), self.n_ctx)
            cfg.update(n_ctx=self.n_ctx, n_seq=self.n_seq, n_batch=self._n_batch,
                       rope_type=ROPE_NEOX if c.rope_neox else ROPE_NORM,
                       rope_attn_factor=c.rope_attn_factor,
                       ffn_act=FFN_GELU if c.ffn_gelu else FFN_SILU, embd_scale=c.embd_scale,
                       attn_scale=c.attn_scale, n_swa=c.n_swa, swa_layers=c.swa_layers)
            self._forward = ModelForward(
                cfg, weight("token_embd.weight"), layers, vector("output_norm.weight"),
                weight("token_embd.weight" if c.tied_output else "output.weight"),
                self._inv_freq, self.n_threads, self._inv_freq_swa)
            # Ring caches (sliding-window layers) and, per sequence, the furthest position
            # ever written: what can_resume needs to know which prefixes a ring still holds
            self._rings = [r for r in (self._forward.cache_positions(i) for i in range(c.n_layer))
                           if r < self.n_ctx]
            self._written = [0] * self.n_seq
            # The kernels now hold repacked copies of the block-quantized matrices; let
            # the file pages they were copied from go, so about one copy stays resident.
            self._file.release_pages(
                name for name, t in tensors.items()
                if t.type in REPACKED_TYPES)
        except BaseException:
            self._file.close()
            raise

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache (fp16 keys and values of every sequence and layer; a
        sliding-window layer's ring instead of n_ctx positions where it is smaller)."""
        return self._forward.kv_cache_bytes

    def can_resume(self, n_past: int, seq: int = 0) -> bool:
        """Whether sequence seq's cache still holds what evaluating from position n_past
        needs. Always, for full caches; a sliding-window layer's ring of R positions
        holds the window before n_past (its n_swa - 1 positions) only if no position
        R or more after that window's start has been written since (n_past = 0 always
        can: it needs nothing)."""
        if n_past <= 0 or not self._rings:
            return True
        start = max(0, n_past - self.config.n_swa + 1)
        return all(self._written[seq] <= start + r for r in self._rings)

    def _check_resume(self, spans) -> None:
        """Refuse, before anything runs, a call that continues a sequence its ring cannot
        resume; then record how far each sequence's span (seq, first, end) writes."""
        for seq, first, _ in spans:
            if not self.can_resume(first, seq):
                raise CacheRewindError(
                    f"the sliding-window cache of sequence {seq} no longer holds the "
                    f"{self.config.n_swa - 1} positions before {first} (positions up to "
                    f"{self._written[seq]} were evaluated since); evaluate it again from "
                    f"position 0")
        for seq, first, end in spans:   # from position 0 the ring is rewritten afresh
            self._written[seq] = max(self._written[seq], end) if first > 0 else end

    def eval(self, tokens, n_past: int, logits_all: bool = False) -> np.ndarray:
        """Run tokens at positions n_past.. (overwriting the KV cache from n_past on);
        float32 logits of the last token (n_vocab,) or of all tokens (len, n_vocab)."""
        return self._eval(tokens, n_past, logits_all, None)

    def eval_trace(self, tokens, n_past: int = 0):
        """eval with logits_all that also returns the residual stream, (n_layer + 1,
        len, n_embd): the embeddings and each layer's output (for layer-by-layer tests)."""
        n = len(tokens)
        trace = np.empty((self.config.n_layer + 1) * n * self.config.n_embd, np.float32)
        logits = self._eval(tokens, n_past, True, trace)
        return logits, trace.reshape(self.config.n_layer + 1, n, self.config.n_embd)

    def _eval(self, tokens, n_past, logits_all, trace):
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size and tokens.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        n = tokens.shape[0]
        if n == 0:
            raise ValueError("eval needs at least one token")
        if n_past < 0:
            raise ValueError(f"n_past must be >= 0, got {n_past}")
        if n_past + n > self.n_ctx:
            raise ContextOverflowError(
                f"{n_past + n} tokens ({n_past} cached + {n} new) do not fit in the "
                f"context of {self.n_ctx} tokens")
        if tokens.min() < 0 or tokens.max() >= self.config.n_vocab:
            bad = tokens[(tokens < 0) | (tokens >= self.config.n_vocab)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary of "
                             f"{self.config.n_vocab}")
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        logits = np.empty((n if logits_all else 1) * self.config.n_vocab, np.float32)
        with self._lock:
            self._check_usable()
            self._check_resume([(0, n_past, n_past + n)])
            self._forward.eval(tokens, n_past, logits, logits_all, trace)
        return logits.reshape(n, -1) if logits_all else logits

    def eval_batch(self, tokens, seq_ids, positions, want_logits=None) -> np.ndarray:
        """Rows from several sequences in one pass over the weights: row i is token
        tokens[i] of sequence seq_ids[i] at position positions[i] (its key and value go
        to that position of that sequence's cache; it attends to that sequence's
        positions 0..positions[i]). Returns float32 logits (n_want, n_vocab) of the rows
        where want_logits is true (default: every row), in row order; each row's are
        the logits evaluating its sequence alone would give, bit for bit."""
        tokens = np.asarray(tokens).reshape(-1)
        seq_ids = np.asarray(seq_ids).reshape(-1)
        positions = np.asarray(positions).reshape(-1)
        n = tokens.shape[0]
        want = (np.ones(n, np.uint8) if want_logits is None
                else np.ascontiguousarray(np.asarray(want_logits).reshape(-1), dtype=bool).astype(np.uint8))
        if n == 0:
            raise ValueError("eval_batch needs at least one row")
        if seq_ids.shape[0] != n or positions.shape[0] != n or want.shape[0] != n:
            raise ValueError(f"tokens ({n}), seq_ids ({seq_ids.shape[0]}), positions "
                             f"({positions.shape[0]}) and want_logits ({want.shape[0]}) "
                             "must have one entry per row")
        for name, a in (("token ids", tokens), ("sequence ids", seq_ids), ("positions", positions)):
            if a.dtype.kind not in "iu":
                raise ValueError(f"{name} must be integers, got {a.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.config.n_vocab:
            bad = tokens[(tokens < 0) | (tokens >= self.config.n_vocab)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary of {self.config.n_vocab}")
        if seq_ids.min() < 0 or seq_ids.max() >= self.n_seq:
            raise ValueError(f"sequence ids must be in 0..{self.n_seq - 1}")
        if positions.min() < 0 or positions.max() >= self.n_ctx:
            raise ContextOverflowError(f"positions must be in 0..{self.n_ctx - 1} (the context "
                                       f"of {self.n_ctx} tokens)")
        cells = seq_ids.astype(np.int64) * self.n_ctx + positions
        if np.unique(cells).shape[0] != n:
            raise ValueError("two rows of the batch are at the same (sequence, position)")
        if self._rings:
            n_batch = self._n_batch
            for c0 in range(0, n, n_batch):
                chunk = slice(c0, c0 + n_batch)
                for seq in np.unique(seq_ids[chunk]):
                    pos = positions[chunk][seq_ids[chunk] == seq]
                    if pos.max() - pos.min() >= n_batch:
                        raise ValueError(
                            f"rows of sequence {seq} within a chunk of {n_batch} rows span "
                            f"{pos.max() - pos.min() + 1} positions; the sliding-window "
                            f"cache needs fewer than {n_batch}")
        logits = np.empty(int(want.sum()) * self.config.n_vocab, np.float32)
        with self._lock:
            self._check_usable()
            if self._rings:
                self._check_resume([(int(s), int(positions[seq_ids == s].min()),
                                     int(positions[seq_ids == s].max()) + 1)
                                    for s in np.unique(seq_ids)])
            self._forward.eval_batch(np.ascontiguousarray(tokens, np.int32),
                                     np.ascontiguousarray(seq_ids, np.int32),
                                     np.ascontiguousarray(positions, np.int32), want, logits)
        return logits.reshape(-1, self.config.n_vocab)

    def _check_usable(self) -> None:
        """Before each evaluation: the model is open and its file is as it was loaded.
        The engine reads weights from the file's memory map, which shows the file's
        current bytes: a file changed in place would silently change the answers, so it
        is refused instead. (Replacing the file by a rename is safe: the map keeps the
        file that was opened. Truncating it while an evaluation runs can still end the
        process with SIGBUS, as for any memory-mapped file.)"""
        if self._forward is None:
            raise ValueError("model is closed")
        change = self._file.changed_on_disk()
        if change:
            raise ModelError(f"{self.path} was {change} after it was loaded; the weights "
                             "kiln reads from it are no longer the model's: load it again")

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            with lock:  # not while an eval on another thread still reads the map
                self._close()
        else:
            self._close()

    def _close(self) -> None:
        fwd, self._forward = getattr(self, "_forward", None), None
        if fwd is not None:
            fwd.close()  # the C engine lets go of the map before it is unmapped
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
