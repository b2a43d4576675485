"""ModelConfig from GGUF metadata: llama.cpp's keys and defaults, clear refusals."""
import numpy as np
import pytest

from engine.config import ModelConfig
from engine.errors import ModelError

SMOLLM2 = {
    "general.architecture": "llama",
    "llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152,
    "llama.rope.dimension_count": 64,
}


def test_smollm2_metadata():
    c = ModelConfig.from_metadata(SMOLLM2, ["token_embd.weight"])
    assert (c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_head_kv, c.head_dim, c.n_ff) == (
        49152, 576, 30, 9, 3, 64, 1536)
    assert (c.n_ctx_train, c.rope_dim, c.rope_freq_base) == (8192, 64, 100000.0)
    assert c.rms_eps == pytest.approx(1e-5)
    assert c.tied_output is True
    assert (c.n_embd_q, c.n_embd_kv) == (576, 192)


def test_defaults_follow_llama_cpp():
    md = {k: v for k, v in SMOLLM2.items() if k not in (
        "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.rope.dimension_count",
        "llama.vocab_size")}
    md["tokenizer.ggml.tokens"] = ["a"] * 100
    c = ModelConfig.from_metadata(md, ["output.weight"])
    assert c.n_head_kv == 9 and c.rope_freq_base == 10000.0 and c.rope_dim == 64
    assert c.n_vocab == 100 and c.tied_output is False
    assert ModelConfig.from_metadata(md).tied_output is None


def test_numpy_scalars_are_accepted():
    md = {k: (np.uint32(v) if isinstance(v, int) else v) for k, v in SMOLLM2.items()}
    assert ModelConfig.from_metadata(md).n_layer == 30


def test_explicit_head_size():
    md = dict(SMOLLM2, **{"llama.attention.key_length": 128,
                          "llama.attention.value_length": 128,
                          "llama.rope.dimension_count": 128})
    assert ModelConfig.from_metadata(md).head_dim == 128


@pytest.mark.parametrize("arch", ["mamba", "gpt2", None])
def test_unknown_architecture_is_named(arch):
    md = dict(SMOLLM2)
    md["general.architecture"] = arch
    with pytest.raises(ModelError, match=repr(arch)):
        ModelConfig.from_metadata(md)


def test_missing_key_is_named():
    md = {k: v for k, v in SMOLLM2.items() if k != "llama.embedding_length"}
    with pytest.raises(ModelError, match="llama.embedding_length"):
        ModelConfig.from_metadata(md)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count_kv", 4, "head_count_kv"),
    ("llama.rope.dimension_count", 63, "dimension_count"),
    ("llama.rope.scaling.type", "yarn", "yarn"),
    ("llama.attention.value_length", 32, "value_length"),
    ("llama.block_count", "many", "block_count"),
    ("llama.attention.key_length", 512, "head size 512"),
])
def test_bad_values_are_refused(key, value, match):
    with pytest.raises(ModelError, match=match):
        ModelConfig.from_metadata(dict(SMOLLM2, **{key: value}))


def test_rope_inv_freq():
    c = ModelConfig.from_metadata(SMOLLM2)
    inv = c.rope_inv_freq()
    assert inv.shape == (32,)
    np.testing.assert_allclose(inv, 100000.0 ** (-np.arange(0, 64, 2) / 64))
    lin = ModelConfig.from_metadata(dict(SMOLLM2, **{"llama.rope.scaling.type": "linear",
                                                     "llama.rope.scaling.factor": 4.0}))
    np.testing.assert_allclose(lin.rope_inv_freq(), inv / 4)
    np.testing.assert_allclose(c.rope_inv_freq(np.full(32, 2.0)), inv / 2)
