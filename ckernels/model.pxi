# Cython binding: model (the forward pass, ckernels/src/forward.{c,h})
from libc.stdint cimport int32_t, uint8_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "forward.h":
    ctypedef struct kiln_model_config:
        int n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_ff, rope_dim, rope_type
        int n_ctx, n_seq, n_batch, ffn_act, n_swa
        float rms_eps, rope_attn_factor, embd_scale
        double attn_scale
        const uint8_t *swa_layers
    ctypedef struct kiln_weight:
        int type
        const void *data
    ctypedef struct kiln_layer_weights:
        const float *attn_norm
        kiln_weight attn_q, attn_k, attn_v, attn_output
        const float *attn_q_bias
        const float *attn_k_bias
        const float *attn_v_bias
        const float *attn_q_norm
        const float *attn_k_norm
        const float *attn_post_norm
        const float *ffn_norm
        kiln_weight ffn_gate, ffn_up, ffn_down
        const float *ffn_post_norm
    ctypedef struct kiln_model_weights:
        kiln_weight token_embd
        const kiln_layer_weights *layers
        const float *output_norm
        kiln_weight output
        const double *rope_inv_freq
        const double *rope_inv_freq_swa
    ctypedef struct kiln_model:
        pass
    kiln_model *kiln_model_create(const kiln_model_config *cfg, const kiln_model_weights *w,
                                  int n_threads) nogil
    void kiln_model_free(kiln_model *m) nogil
    int kiln_model_n_threads(const kiln_model *m) nogil
    int kiln_model_cache_positions(const kiln_model *m, int layer) nogil
    size_t kiln_model_kv_cache_bytes(const kiln_model *m) nogil
    int kiln_model_eval_trace(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                              float *logits, int logits_all, float *trace) nogil
    int kiln_model_get_kv(const kiln_model *m, int layer, int n, float *keys,
                          float *values) nogil
    int kiln_model_eval(kiln_model *m, const int32_t *tokens, int n_tokens, int n_past,
                        float *logits, int logits_all) nogil
    int kiln_model_eval_batch(kiln_model *m, const int32_t *tokens, const int32_t *seq_ids,
                              const int32_t *positions, int n_tokens, const uint8_t *logits_rows,
                              float *logits) nogil


cdef kiln_weight _weight(w):
    """(ggml type id, address) -> kiln_weight"""
    cdef kiln_weight out
    out.type = <int>w[0]
    out.data = <const void *><uintptr_t>w[1]
    return out


cdef class ModelForward:
    """The C forward pass over weights at the given addresses.

    The caller validates shapes and types and keeps the memory behind every address
    alive for the object's lifetime (engine/model.py does both). `layers` is a list of
    per-layer dicts with keys attn_norm, ffn_norm (addresses of float32 vectors),
    attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down ((type, address))
    and, optionally, attn_q_bias, attn_k_bias, attn_v_bias, attn_q_norm, attn_k_norm,
    attn_post_norm, ffn_post_norm (addresses of float32 vectors, 0 for none).
    config["rope_type"] is ggml's rope mode (0 interleaved pairs, 2 NEOX), config["ffn_act"]
    forward.h's kiln_ffn_act (0 SiLU, 1 GELU); config["swa_layers"] (n_layer flags) marks
    the layers that attend to config["n_swa"] positions, rotated by rope_inv_freq_swa."""
    cdef kiln_model *model
    cdef readonly int n_vocab, n_ctx, n_seq, kv_dim, n_layer, n_embd

    def __cinit__(self, dict config, token_embd, list layers, uintptr_t output_norm,
                  output, const double[::1] rope_inv_freq, int n_threads,
                  const double[::1] rope_inv_freq_swa=None):
        cdef kiln_model_config c
        cdef kiln_model_weights w
        cdef kiln_layer_weights *lw
        cdef int i
        self.model = NULL
        _check_n_threads(n_threads)
        c.n_vocab = config["n_vocab"]
        c.n_embd = config["n_embd"]
        c.n_layer = config["n_layer"]
        c.n_head = config["n_head"]
        c.n_head_kv = config["n_head_kv"]
        c.head_dim = config["head_dim"]
        c.n_ff = config["n_ff"]
        c.rope_dim = config["rope_dim"]
        c.rope_type = config.get("rope_type", 0)
        c.n_ctx = config["n_ctx"]
        c.n_seq = config.get("n_seq", 1)
        c.n_batch = config["n_batch"]
        c.rms_eps = config["rms_eps"]
        c.rope_attn_factor = config.get("rope_attn_factor", 1.0)
        c.ffn_act = config.get("ffn_act", 0)
        c.embd_scale = config.get("embd_scale", 1.0)
        c.attn_scale = config.get("attn_scale", 0.0)
        c.n_swa = config.get("n_swa", 0)
        swa = bytes(bytearray(int(bool(f)) for f in config.get("swa_layers", ())))
        if len(swa) not in (0, c.n_layer):
            raise ValueError("swa_layers does not have one flag per layer")
        cdef const unsigned char[::1] swa_view = swa if swa else None
        c.swa_layers = <const uint8_t *>&swa_view[0] if swa else NULL
        if len(layers) != c.n_layer or rope_inv_freq.shape[0] != c.rope_dim // 2 or (
                rope_inv_freq_swa is not None and rope_inv_freq_swa.shape[0] != c.rope_dim // 2):
            raise ValueError("layer list or rope table does not match the config")
        lw = <kiln_layer_weights *>calloc(max(c.n_layer, 1), sizeof(kiln_layer_weights))
        if lw == NULL:
            raise MemoryError()
        try:
            for i in range(c.n_layer):
                d = layers[i]
                lw[i].attn_norm = <const float *><uintptr_t>d["attn_norm"]
                lw[i].ffn_norm = <const float *><uintptr_t>d["ffn_norm"]
                lw[i].attn_q = _weight(d["attn_q"])
                lw[i].attn_k = _weight(d["attn_k"])
                lw[i].attn_v = _weight(d["attn_v"])
                lw[i].attn_output = _weight(d["attn_output"])
                lw[i].ffn_gate = _weight(d["ffn_gate"])
                lw[i].ffn_up = _weight(d["ffn_up"])
                lw[i].ffn_down = _weight(d["ffn_down"])
                lw[i].attn_q_bias = <const float *><uintptr_t>d.get("attn_q_bias", 0)
                lw[i].attn_k_bias = <const float *><uintptr_t>d.get("attn_k_bias", 0)
                lw[i].attn_v_bias = <const float *><uintptr_t>d.get("attn_v_bias", 0)
                lw[i].attn_q_norm = <const float *><uintptr_t>d.get("attn_q_norm", 0)
                lw[i].attn_k_norm = <const float *><uintptr_t>d.get("attn_k_norm", 0)
                lw[i].attn_post_norm = <const float *><uintptr_t>d.get("attn_post_norm", 0)
                lw[i].ffn_post_norm = <const float *><uintptr_t>d.get("ffn_post_norm", 0)
            w.token_embd = _weight(token_embd)
            w.layers = lw
            w.output_norm = <const float *>output_norm
            w.output = _weight(output)
            w.rope_inv_freq = &rope_inv_freq[0] if rope_inv_freq.shape[0] else NULL
            w.rope_inv_freq_swa = (&rope_inv_freq_swa[0] if rope_inv_freq_swa is not None
                                   and rope_inv_freq_swa.shape[0] else NULL)
            with nogil:
                self.model = kiln_model_create(&c, &w, n_threads)
        finally:
            free(lw)
        if self.model == NULL:
            raise MemoryError("could not build the model: out of memory, a weight type "
                              "the kernels do not support or a bad rope_type")
        self.n_vocab = c.n_vocab
        self.n_ctx = c.n_ctx
        self.n_seq = c.n_seq
        self.kv_dim = c.n_head_kv * c.head_dim
        self.n_layer = c.n_layer
        self.n_embd = c.n_embd

    def __dealloc__(self):
        if self.model != NULL:
            kiln_model_free(self.model)
            self.model = NULL

    @property
    def n_threads(self):
        return kiln_model_n_threads(self.model)

    @property
    def kv_cache_bytes(self):
        """Bytes allocated for the KV cache."""
        if self.model == NULL:
            raise ValueError("model is closed")
        return kiln_model_kv_cache_bytes(self.model)

    def cache_positions(self, int layer):
        """Positions of a layer's KV cache per sequence: n_ctx, or a sliding-window
        layer's ring."""
        if self.model == NULL:
            raise ValueError("model is closed")
        cdef int n = kiln_model_cache_positions(self.model, layer)
        if n < 0:
            raise ValueError(f"no layer {layer}")
        return n

    def eval(self, const int32_t[::1] tokens, int n_past, float[::1] logits, bint logits_all,
             float[::1] trace=None):
        """Runs tokens at positions n_past..; logits (flat float32) receives
        len(tokens) * n_vocab values when logits_all, else n_vocab. trace (flat
        float32, (n_layer + 1) * len(tokens) * n_embd), when given, receives the
        residual stream before and after each layer."""
        cdef int n = tokens.shape[0]
        cdef int rc
        cdef float *trace_ptr = NULL
        if self.model == NULL:
            raise ValueError("model is closed")
        if n < 1 or logits.shape[0] != (n if logits_all else 1) * self.n_vocab:
            raise ValueError("empty token list or logits buffer of the wrong size")
        if trace is not None:
            if trace.shape[0] != (self.n_layer + 1) * n * self.n_embd:
                raise ValueError("trace buffer of the wrong size")
            trace_ptr = &trace[0]
        with nogil:
            rc = kiln_model_eval_trace(self.model, &tokens[0], n, n_past, &logits[0],
                                       logits_all, trace_ptr)
        if rc != 0:
            raise ValueError(f"eval of {n} tokens at n_past={n_past} refused: context "
                             f"of {self.n_ctx} exceeded or a token id outside the vocabulary")

    def eval_batch(self, const int32_t[::1] tokens, const int32_t[::1] seq_ids,
                   const int32_t[::1] positions, const uint8_t[::1] logits_rows, float[::1] logits):
        """Rows i = (tokens[i], sequence seq_ids[i], position positions[i]) in one pass
        over the weights; logits (flat float32) receives n_vocab values for each row
        with logits_rows[i] != 0, in order."""
        cdef int n = tokens.shape[0], rc, i, n_out = 0
        if self.model == NULL:
            raise ValueError("model is closed")
        if n < 1 or seq_ids.shape[0] != n or positions.shape[0] != n or logits_rows.shape[0] != n:
            raise ValueError("empty batch or row arrays of different lengths")
        for i in range(n):
            n_out += logits_rows[i] != 0
        if logits.shape[0] != n_out * self.n_vocab or (n_out and logits.shape[0] == 0):
            raise ValueError("logits buffer of the wrong size")
        with nogil:
            rc = kiln_model_eval_batch(self.model, &tokens[0], &seq_ids[0], &positions[0], n,
                                       &logits_rows[0], &logits[0] if n_out else NULL)
        if rc != 0:
            raise ValueError(f"batch of {n} rows refused: a sequence outside 0..{self.n_seq - 1}, "
                             f"a position outside 0..{self.n_ctx - 1}, a token id outside the "
                             f"vocabulary, or two rows at one (sequence, position)")

    def kv_cache(self, int layer, int n):
        """Copies of the cached keys (after RoPE) and values of positions [0, n) of a
        layer, each (n, kv_dim) float32: for tests."""
        keys = np.zeros((max(n, 1), self.kv_dim), np.float32)
        values = np.zeros((max(n, 1), self.kv_dim), np.float32)
        cdef float[:, ::1] kv = keys
        cdef float[:, ::1] vv = values
        if self.model == NULL or kiln_model_get_kv(self.model, layer, n, &kv[0, 0], &vv[0, 0]):
            raise ValueError(f"no layer {layer} / {n} positions in the KV cache")
        return keys[:n], values[:n]

    def close(self):
        if self.model != NULL:
            kiln_model_free(self.model)
            self.model = NULL
