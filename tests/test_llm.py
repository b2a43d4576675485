"""The LLM API on the real SmolLM2-135M-Instruct: fluent greedy text, stop strings split
across real tokens, streaming == blocking, seeds, thread counts, KV-cache prefix reuse,
the context limits, teacher-forced logits, chat."""
import numpy as np
import pytest

from engine import LLM
from engine.errors import ContextOverflowError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    with LLM(smollm2_path, n_ctx=256, n_threads=2) as llm:
        yield llm


def test_capital_of_france_is_fluent(llm):
    out = llm.generate(PROMPT, max_tokens=16, temperature=0)
    assert "Paris" in out.text
    assert len(out.tokens) == 16 and out.finish_reason == "length"
    assert llm.detokenize(out.tokens) == out.text
    t = out.timings
    assert t.prompt_tokens == len(llm.tokenize(PROMPT)) and t.generated_tokens == 16
    assert t.prompt_tokens_per_second > 0 and t.tokens_per_second > 0


def test_stop_string_split_across_tokens(llm):
    full = llm.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
    # pick a stop string made of the end of one token's text and the start of the next's
    pieces = [llm.detokenize([t]) for t in full.tokens]
    i = next(i for i in range(1, len(pieces) - 1)
             if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    expected = full.text[:full.text.index(stop)]
    out = llm.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=["zzzz", stop])
    assert (out.text, out.finish_reason) == (expected, "stop")
    streamed = list(llm.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop=stop,
                                 stream=True))
    assert "".join(streamed) == expected
    assert stop not in "".join(streamed)


def test_streaming_equals_blocking_with_sampling(llm):
    kw = dict(max_tokens=24, temperature=0.8, seed=11)
    blocking = llm.generate("Tell me about cats.", **kw)
    pieces = list(llm.generate("Tell me about cats.", stream=True, **kw))
    assert "".join(pieces) == blocking.text
    assert llm.last_completion.tokens == blocking.tokens
    assert all(isinstance(p, str) and p for p in pieces)


def test_seed_reproducible_and_independent_of_threads(smollm2_path, llm):
    kw = dict(max_tokens=20, temperature=1.0, seed=1234)
    a = llm.generate("My favourite animal is", **kw)
    b = llm.generate("My favourite animal is", **kw)
    assert a.tokens == b.tokens
    with LLM(smollm2_path, n_ctx=256, n_threads=1) as one_thread:
        assert one_thread.generate("My favourite animal is", **kw).tokens == a.tokens
    others = [llm.generate("My favourite animal is", **dict(kw, seed=s)).tokens for s in (1, 2, 3)]
    assert any(o != a.tokens for o in others)


def test_prefix_reuse_evaluates_only_new_tokens_and_matches_a_fresh_run(llm):
    llm.reset()
    first = llm.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
    prompt2 = llm.tokenize(PROMPT) + first.tokens + llm.tokenize(" It is also")
    before = llm.n_tokens_evaluated
    reused = llm.generate(prompt2, max_tokens=8, temperature=0, ignore_eos=True)
    n_new = len(prompt2) - len(llm.tokenize(PROMPT)) - 7   # the 8th token was never run
    assert reused.timings.prompt_tokens_evaluated == n_new
    assert llm.n_tokens_evaluated - before == n_new + 7
    llm.reset()
    fresh = llm.generate(prompt2, max_tokens=8, temperature=0, ignore_eos=True)
    assert fresh.timings.prompt_tokens_evaluated == len(prompt2)
    assert fresh.tokens == reused.tokens


def test_prompt_longer_than_context(smollm2_path):
    with LLM(smollm2_path, n_ctx=16, n_threads=2) as small:
        long_prompt = " ".join(["one two three four five"] * 4)
        n = len(small.tokenize(long_prompt))
        assert n > 16
        with pytest.raises(ContextOverflowError, match=fr"{n} tokens.*holds 16"):
            small.generate(long_prompt)
        # filling the context ends with "length"
        ids = small.tokenize("one two three four five")
        out = small.generate(ids, max_tokens=None, temperature=0, ignore_eos=True)
        assert out.finish_reason == "length" and len(ids) + len(out.tokens) == 16


def test_logits_teacher_forced(llm):
    ids = llm.tokenize("The capital of France is Paris. The capital of Italy is Rome.")
    lg = llm.logits(ids)
    assert lg.shape == (len(ids), llm.n_vocab) and lg.dtype == np.float32
    # each row predicts the next token; after the first sentence the model knows the pattern
    greedy = llm.generate(ids[:6], max_tokens=1, temperature=0).tokens[0]
    assert int(lg[5].argmax()) == greedy
    rome = ids[-2]
    assert int(lg[-3].argmax()) == rome


def test_eos_ends_a_chat_turn(llm):
    # special-token text in a generate() prompt is parsed (the app wrote the template)
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    out = llm.generate(prompt, max_tokens=48, temperature=0)
    assert out.finish_reason == "stop" and "4" in out.text and len(out.tokens) < 48
    assert not set(out.tokens) & set(llm.tokenizer.eog_ids)
    assert "<|im_end|>" not in out.text
    # ignore_eos runs past the end of turn
    longer = llm.generate(prompt, max_tokens=len(out.tokens) + 4, temperature=0, ignore_eos=True)
    assert longer.finish_reason == "length" and longer.tokens[:len(out.tokens)] == out.tokens
    assert set(longer.tokens) & set(llm.tokenizer.eog_ids)


def test_chat_delegates_to_the_chat_module(llm):
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = llm.chat(question, temperature=0, max_tokens=32)
    assert "Paris" in out.text and out.finish_reason == "stop"
    pieces = list(llm.chat(question, temperature=0, max_tokens=32, stream=True))
    assert "".join(pieces) == out.text


def test_threads_sharing_one_llm_get_their_own_answers(llm):
    """Calls from several threads on one LLM are serialized (one model, one KV cache):
    each returns what it returns alone, never a mix of the two conversations."""
    import threading
    prompts = [PROMPT, "Water boils at a temperature of"]
    alone = [llm.generate(p, max_tokens=12, temperature=0).text for p in prompts]
    for _ in range(3):
        got, errors = {}, []

        def run(i):
            try:
                got[i] = llm.generate(prompts[i % 2], max_tokens=12, temperature=0).text
            except BaseException as e:  # noqa: BLE001 - the test reports it
                errors.append(e)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert [got[i] for i in range(4)] == [alone[i % 2] for i in range(4)]


def test_a_stream_read_in_another_thread_meanwhile_fails_clearly(llm):
    """A stream left unfinished while another call runs raises on its next read, with a
    message saying why; the other call's answer is unaffected."""
    import threading
    alone = llm.generate(PROMPT, max_tokens=8, temperature=0).text
    stream = llm.generate("Water boils at", max_tokens=32, temperature=0, ignore_eos=True, stream=True)
    next(stream)
    got = {}
    t = threading.Thread(target=lambda: got.update(text=llm.generate(PROMPT, max_tokens=8,
                                                                      temperature=0).text))
    t.start()
    t.join()
    assert got["text"] == alone
    with pytest.raises(RuntimeError, match="another call on this LLM started"):
        next(stream)


def test_absurd_context_is_refused_before_allocating(smollm2_path):
    from engine.errors import ModelError
    with pytest.raises(ModelError, match=r"n_ctx=1000000000 needs a KV cache of [0-9.]+ GiB, "
                                         r"more than this machine's [0-9.]+ GiB"):
        LLM(smollm2_path, n_ctx=10**9)


def test_context_above_the_trained_one_warns_and_runs(smollm2_path):
    with pytest.warns(UserWarning, match="longer than the 8192 tokens the model was trained for"):
        llm = LLM(smollm2_path, n_ctx=8192 + 16, n_threads=2)
    with llm:
        assert "Paris" in llm.generate(PROMPT, max_tokens=8, temperature=0).text


def test_llms_created_and_closed_leak_no_descriptors_mappings_or_memory(smollm2_path):
    """Opening and closing models over and over (an app reloading, a server swapping
    models) keeps file descriptors and mappings at their count and memory flat: after
    the allocator has warmed up, 12 more loads add nothing (a leaked model would be
    100 MB each; the allocator keeps a few MB of slack between loads)."""
    import gc
    import os

    def state():
        gc.collect()
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        return len(os.listdir("/proc/self/fd")), maps, rss

    def cycle():
        with LLM(smollm2_path, n_ctx=128, n_threads=2) as llm:
            llm.generate(PROMPT, max_tokens=2, temperature=0)

    for _ in range(6):
        cycle()
    fds0, maps0, rss0 = state()
    for _ in range(12):
        cycle()
    fds, maps, rss = state()
    assert fds == fds0, f"{fds - fds0} file descriptors left open over 12 loads"
    assert maps <= maps0 + 8, f"{maps - maps0} more mappings after 12 loads"
    assert rss - rss0 < 30, f"RSS grew {rss - rss0} MB over 12 loads"


def test_a_hundred_llms_closed_or_left_to_a_with_block_leave_nothing_open(tmp_path):
    """100 LLM objects, half closed by LLM.close(), half by leaving a with block (and one
    closed twice): not one file descriptor or mapping more than before them."""
    import gc
    import os

    import tiny_models
    path = tiny_models.make_tiny_llama(tmp_path / "tiny.gguf")

    def counts():
        gc.collect()
        with open("/proc/self/maps") as f:
            return len(os.listdir("/proc/self/fd")), sum(1 for _ in f)

    with LLM(path, n_ctx=64, n_threads=1) as llm:  # warm up (imports, allocator)
        llm.generate([1, 2, 3], max_tokens=2, temperature=0)
    before = counts()
    for i in range(100):
        if i % 2:
            with LLM(path, n_ctx=64, n_threads=1) as llm:
                llm.generate([1, 2, 3], max_tokens=2, temperature=0)
        else:
            llm = LLM(path, n_ctx=64, n_threads=1)
            llm.generate([1, 2, 3], max_tokens=2, temperature=0)
            llm.close()
            llm.close()  # closing twice is harmless
    fds, maps = counts()
    assert fds == before[0], f"{fds - before[0]} file descriptors left open by 100 LLMs"
    assert maps <= before[1] + 4, f"{maps - before[1]} more mappings after 100 LLMs"
