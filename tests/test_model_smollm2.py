"""The C engine on the real SmolLM2-135M-Instruct against the NumPy reference.

Held to: teacher-forced logits over 512 tokens of text, top-1 agreement >= 99%
and mean KL < 1e-3 against the reference emulating activation quantization, for the
file as shipped (Q4_1) and for Q4_0/Q8_0/F16 re-encodings of it.

On this model the Q8-activation computation is chaotic: nudging the activations by
1e-7 (relative) before each quantization flips a few int8 roundings, the change grows
over 30 layers, and the logits move as far as llama.cpp's are from an exact float
computation (top-1 ~96%, mean KL ~4e-3). So agreement needs the two engines to agree on
every rounding. They do: both compute each value that is later quantized in double
and round it to float once (ckernels/src/forward.c), and with quantized weights the
logits are equal bit for bit, which is asserted too. With F16 weights there is no
activation quantization and nothing to flip; the float products are summed in
different orders and agree to rounding.
"""
import numpy as np
import pytest

from engine.model import Model
from engine.reference import ReferenceModel
from tiny_models import mean_kl

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
        from engine.tokenizer import load_tokenizer
        with formats.read_gguf(smollm2_path) as f:
            ids = load_tokenizer(f.metadata).encode(TEXT)
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


@pytest.mark.parametrize("variant", ["q4_1", "q4_0", "q8_0", "f16"])
def test_smollm2_matches_reference(smollm2_variant, tokens, variant):
    path = smollm2_variant(variant)
    with Model(path, n_ctx=N_TOKENS, n_threads=2) as m:
        logits = m.eval(tokens, 0, logits_all=True)
        single = np.stack([m.eval(tokens[i:i + 1], i) for i in range(16)])
    want = ReferenceModel(path)(tokens)
    agree = (logits.argmax(-1) == want.argmax(-1)).mean()
    kl = mean_kl(want, logits)
    print(f"{variant}: top-1 agreement {agree:.4f}, mean KL {kl:.2e}, "
          f"bit-identical logits {np.mean(logits == want):.4f}")
    assert agree >= 0.99
    assert kl < 1e-3
    if variant != "f16":
        np.testing.assert_array_equal(logits, want)
    np.testing.assert_array_equal(single, logits[:16])  # token by token = batched


@pytest.mark.oracle
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
