"""The sampler: each filter against a hand-computed distribution, the chain's order,
determinism by seed, and validation of every knob."""
import math

import numpy as np
import pytest

from engine.sampler import (Sampler, SamplingParams, apply_repeat_penalty, check_seed, min_p,
                            softmax, top_k, top_p)


def _ids(n):
    return np.arange(n)


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 1, 1], 2.0)
    # token 0: 2/2, token 1: -1*2 (once, however often it repeats), others untouched
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 0.5, 3.0])  # input not modified
    assert apply_repeat_penalty(logits, [0, 1], 1.0) is logits


def test_top_k_keeps_k_highest_sorted():
    logits = np.array([0.1, 5.0, 3.0, -2.0, 4.0], dtype=np.float32)
    ids, vals = top_k(_ids(5), logits, 3)
    assert ids.tolist() == [1, 4, 2]
    assert vals.tolist() == [5.0, 4.0, 3.0]
    ids, _ = top_k(_ids(5), logits, 0)  # 0 = disabled: all, sorted
    assert ids.tolist() == [1, 4, 2, 0, 3]


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    # cumulative 0.5, 0.8, 0.95, 1.0
    assert top_p(_ids(4), logits, 0.79)[0].tolist() == [0, 1]
    assert top_p(_ids(4), logits, 0.81)[0].tolist() == [0, 1, 2]
    assert top_p(_ids(4), logits, 0.4)[0].tolist() == [0]        # always at least one
    assert top_p(_ids(4), logits, 1.0)[0].tolist() == [0, 1, 2, 3]


def test_min_p_relative_to_the_top_probability():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    # threshold 0.2 * 0.5 = 0.1: keeps 0.5, 0.3, 0.15
    assert min_p(_ids(4), logits, 0.2)[0].tolist() == [0, 1, 2]
    assert min_p(_ids(4), logits, 0.7)[0].tolist() == [0]
    assert min_p(_ids(4), logits, 0.0)[0].tolist() == [0, 1, 2, 3]


def test_temperature_reshapes_the_survivors():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0))
    ids, probs = s.candidates(logits)
    expected = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-6)
    assert ids.tolist() == [0, 1, 2, 3]


def test_chain_order_top_p_and_min_p_see_untempered_probabilities():
    # With temperature applied last (llama.cpp's order), top-p 0.8 keeps {0, 1} from the
    # untempered [0.5, 0.3, 0.15, 0.05]; a high temperature would otherwise let more in.
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=0.8, min_p=0.0))
    assert s.candidates(logits)[0].tolist() == [0, 1]
    s = Sampler(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.5))
    assert s.candidates(logits)[0].tolist() == [0, 1]


def test_chain_order_penalty_before_top_k():
    # the penalty demotes token 0 below token 2 before top-k 2 picks the survivors
    logits = np.array([3.0, 2.5, 2.0, -1.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, repeat_penalty=2.0))
    assert s.candidates(logits, recent_tokens=[0])[0].tolist() == [1, 2]


def test_repeat_penalty_only_over_last_n():
    logits = np.array([3.0, 2.9, 0.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=2.0, penalty_last_n=2))
    assert s.sample(logits, recent_tokens=[2, 2, 2]) == 0
    assert s.sample(logits, recent_tokens=[2, 0, 2]) == 1
    assert s.sample(logits, recent_tokens=[0, 2, 2]) == 0  # token 0 is outside the window


def test_greedy_is_argmax_and_ignores_the_rng():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(1000).astype(np.float32)
    s = Sampler(SamplingParams(temperature=0))
    assert all(s.sample(logits) == int(np.argmax(logits)) for _ in range(5))


def test_defaults_are_llama_cpp_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.penalty_last_n) == \
        (0.8, 40, 0.95, 0.05, 1.0, 64)


def test_draws_follow_the_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), seed=0)
    logits = np.log(probs).astype(np.float32)
    counts = np.bincount([s.sample(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)


def test_same_seed_same_tokens_different_seed_differs():
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((50, 500)).astype(np.float32) * 2
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed):
        s = Sampler(params, seed=seed)
        return [s.sample(r) for r in rows]
    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(None) != run(None)  # unseeded calls draw fresh entropy


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_p=float("nan")), "min_p"),
    (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(repeat_penalty=float("nan")), "repeat_penalty"),
    (dict(temperature="hot"), "temperature"),
])
def test_invalid_values_raise_value_error_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("seed", [-1, 1.5, "x", True])
def test_invalid_seed(seed):
    with pytest.raises(ValueError, match="seed"):
        check_seed(seed)


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([1000.0, 999.0], dtype=np.float32))
    np.testing.assert_allclose(p, [1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))])
