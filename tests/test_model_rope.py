"""Forward-pass features beyond the plain Llama through the C engine, against the NumPy
reference: BF16 weights, partial RoPE (rope.dimension_count < head size), linear RoPE
scaling and Llama 3.1's rope_freqs tensor. Each case also differs from the same weights
without the feature, so a feature both engines ignored would not pass."""
import numpy as np
import pytest

from engine.model import Model
from engine.reference import ReferenceModel
from tiny_models import make_tiny_llama, mean_kl

HEAD_DIM = 32
FEATURES = {
    "plain": {},
    "partial_rope": {"rope_dim": HEAD_DIM // 2},
    "linear_scaling": {"rope_scaling_factor": 4.0},
    "rope_freqs": {"rope_freqs": np.linspace(1.0, 8.0, HEAD_DIM // 2)},
    "partial_rope_freqs": {"rope_dim": HEAD_DIM // 2,
                           "rope_freqs": np.linspace(1.0, 3.0, HEAD_DIM // 4)},
}
N_TOKENS = 48


def logits_of(tmp_path, name, ftype, **feature):
    path = make_tiny_llama(tmp_path / f"{name}-{ftype}.gguf", n_layer=2, n_embd=64, n_head=4,
                           n_head_kv=2, head_dim=HEAD_DIM, n_ff=96, ftype=ftype, seed=3,
                           rope_freq_base=100.0, **feature)
    ref = ReferenceModel(path)
    tokens = np.random.default_rng(1).integers(0, ref.config.n_vocab, N_TOKENS)
    with Model(path, n_ctx=64, n_threads=2) as m:
        ours = m.eval(tokens, 0, logits_all=True)
    return ours, ref(tokens), ReferenceModel(path, emulate_q8=False)(tokens)


@pytest.mark.parametrize("ftype", ["q8_0", "bf16"])
@pytest.mark.parametrize("name", [n for n in FEATURES if n != "plain"])
def test_feature_runs_in_c_as_in_the_reference(tmp_path, name, ftype):
    ours, ref_q8, ref_float = logits_of(tmp_path, name, ftype, **FEATURES[name])
    if ftype == "q8_0":
        np.testing.assert_array_equal(ours, ref_q8)  # quantized: bit for bit
    assert np.abs(ours - ref_q8).max() <= 1e-3 * np.abs(ref_q8).max()
    assert mean_kl(ref_float, ours) < 1e-3
    plain, _, _ = logits_of(tmp_path, "plain", ftype)
    # ignored by both engines, the feature would leave these logits exactly as they are
    assert not np.array_equal(plain, ours), "the feature changed nothing"


def test_bf16_weights_match_the_reference(tmp_path):
    ours, ref_q8, ref_float = logits_of(tmp_path, "plain", "bf16")
    assert np.abs(ours - ref_q8).max() <= 1e-3 * np.abs(ref_q8).max()
    assert mean_kl(ref_float, ours) < 1e-3
