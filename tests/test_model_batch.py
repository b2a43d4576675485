"""Model.eval_batch: rows of several sequences in one pass over the weights, each with its
own KV cache, give exactly the logits each sequence gets evaluated alone."""
import numpy as np
import pytest

from engine.errors import ContextOverflowError
from engine.model import Model
from tiny_models import make_tiny_llama

PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [7, 7, 120, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module", params=["q8_0", "q4_0", "f16"])
def tiny(request, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("batch") / f"m-{request.param}.gguf",
                           ftype=request.param, n_layer=2, n_embd=64, n_head=4, n_head_kv=2)


def alone(path, prompt, steps, n_threads=1):
    """Logits of the prompt's last token, then of each greedy step, one sequence alone."""
    with Model(path, n_ctx=64, n_threads=n_threads) as m:
        out = [m.eval(prompt, 0)]
        n = len(prompt)
        for _ in range(steps):
            tok = int(np.argmax(out[-1]))
            out.append(m.eval([tok], n))
            n += 1
    return out


@pytest.mark.parametrize("n_threads", [1, 2])
def test_batched_decoding_is_exact(tiny, n_threads):
    steps = 6
    want = [alone(tiny, p, steps) for p in PROMPTS]
    with Model(tiny, n_ctx=64, n_threads=n_threads, n_seq=len(PROMPTS), n_batch=8) as m:
        # every prompt in one call (more rows than n_batch: chunked), logits of last rows
        tokens = [t for p in PROMPTS for t in p]
        seqs = [s for s, p in enumerate(PROMPTS) for _ in p]
        pos = [i for p in PROMPTS for i in range(len(p))]
        last = [i == len(p) - 1 for p in PROMPTS for i in range(len(p))]
        got = [[row] for row in m.eval_batch(tokens, seqs, pos, last)]
        lengths = [len(p) for p in PROMPTS]
        for _ in range(steps):
            toks = [int(np.argmax(g[-1])) for g in got]
            # the rows in a different order each step: order must not matter
            order = list(range(len(PROMPTS)))[::(-1) ** len(got[0])]
            logits = m.eval_batch([toks[s] for s in order], order, [lengths[s] for s in order])
            for row, s in zip(logits, order):
                got[s].append(row)
                lengths[s] += 1
    for s in range(len(PROMPTS)):
        for step, (g, w) in enumerate(zip(got[s], want[s])):
            assert np.array_equal(g, w), f"sequence {s}, step {step}: batched != alone"


def test_a_prompt_joins_while_others_decode(tiny):
    """Continuous batching: sequence 1's prompt rows ride along with sequence 0's step."""
    want0 = alone(tiny, PROMPTS[0], 2)
    want1 = alone(tiny, PROMPTS[1], 0)
    with Model(tiny, n_ctx=64, n_threads=1, n_seq=2) as m:
        l0 = m.eval_batch(PROMPTS[0], [0] * len(PROMPTS[0]), range(len(PROMPTS[0])),
                          [False] * (len(PROMPTS[0]) - 1) + [True])[0]
        assert np.array_equal(l0, want0[0])
        t0 = int(np.argmax(l0))
        n0 = len(PROMPTS[0])
        rows = [t0] + PROMPTS[1]
        seqs = [0] + [1] * len(PROMPTS[1])
        pos = [n0] + list(range(len(PROMPTS[1])))
        out = m.eval_batch(rows, seqs, pos, [True] + [False] * (len(PROMPTS[1]) - 1) + [True])
        assert np.array_equal(out[0], want0[1]) and np.array_equal(out[1], want1[0])


def test_sequence_zero_is_what_eval_uses(tiny):
    with Model(tiny, n_ctx=64, n_threads=1, n_seq=2) as m:
        a = m.eval(PROMPTS[2], 0)
        b = m.eval_batch(PROMPTS[2], [0] * len(PROMPTS[2]), range(len(PROMPTS[2])))[-1]
        assert np.array_equal(a, b)


def test_bad_batches_are_refused(tiny):
    with Model(tiny, n_ctx=16, n_threads=1, n_seq=2) as m:
        with pytest.raises(ValueError, match="same"):
            m.eval_batch([1, 2], [0, 0], [3, 3])
        with pytest.raises(ValueError, match="sequence ids"):
            m.eval_batch([1], [2], [0])
        with pytest.raises(ContextOverflowError, match="positions"):
            m.eval_batch([1], [0], [16])
        with pytest.raises(ValueError, match="vocabulary"):
            m.eval_batch([10 ** 6], [0], [0])
        with pytest.raises(ValueError, match="one entry per row"):
            m.eval_batch([1, 2], [0], [0, 1])
        with pytest.raises(ValueError, match="at least one row"):
            m.eval_batch([], [], [])
        with pytest.raises(ValueError, match="n_seq"):
            Model(tiny, n_ctx=16, n_threads=1, n_seq=0)
        # and the model still works
        assert m.eval([1, 2, 3], 0).shape == (m.config.n_vocab,)


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])  # float weights agree across ISAs only
def test_batched_rows_match_scalar_alone_on_every_isa(ftype, tmp_path, isa_restored):  # within rounding
    import ckernels
    tiny = make_tiny_llama(tmp_path / "m.gguf", ftype=ftype, n_layer=2, n_embd=64, n_head=4, n_head_kv=2)
    ckernels.set_isa("scalar")
    want = [alone(tiny, p, 2) for p in PROMPTS]
    for isa in ckernels.supported_isas():
        ckernels.set_isa(isa)
        with Model(tiny, n_ctx=64, n_threads=2, n_seq=len(PROMPTS)) as m:
            tokens = [t for p in PROMPTS for t in p]
            seqs = [s for s, p in enumerate(PROMPTS) for _ in p]
            pos = [i for p in PROMPTS for i in range(len(p))]
            last = [i == len(p) - 1 for p in PROMPTS for i in range(len(p))]
            got = m.eval_batch(tokens, seqs, pos, last)
            for s in range(len(PROMPTS)):
                assert np.array_equal(got[s], want[s][0]), f"{isa}: sequence {s}"
            toks = [int(np.argmax(g)) for g in got]
            step = m.eval_batch(toks, range(len(PROMPTS)), [len(p) for p in PROMPTS])
            for s in range(len(PROMPTS)):
                assert np.array_equal(step[s], want[s][1]), f"{isa}: sequence {s}, step 1"
