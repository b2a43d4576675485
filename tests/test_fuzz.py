"""The GGUF fuzzer (tests/gguf_fuzz.py): a CI-sized run over every seed must find no
crash, hang or foreign exception; a planted failure of each kind must be caught, saved
and survived; and the files earlier runs found stay fixed."""
import os
import signal
import struct
import time
from pathlib import Path

import pytest

import formats
import gguf_fuzz
from engine import LLM
from engine.errors import ModelError
from tiny_models import make_tiny_llama

# The CI-sized run: at about 700 mutants a second on two workers (AMD EPYC Zen 3) this is
# well under a minute. Under `make test-asan` the sanitized engine is far slower, so the
# run there is smaller.
SANITIZED = gguf_fuzz.SANITIZED
CI_MUTANTS = 2000 if SANITIZED else 8000


def test_ci_sized_run_finds_no_crash_hang_or_foreign_exception(smollm2_path, tmp_path_factory):
    seeds = gguf_fuzz.make_seeds(tmp_path_factory.mktemp("seeds"), smollm2_path)
    assert len(seeds) == len(gguf_fuzz.SEED_MODELS) + 2
    work, crashers = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("crashers")
    report = gguf_fuzz.run(seeds, CI_MUTANTS, workdir=work, crashers=crashers, rng_seed=17,
                           timeout=120 if SANITIZED else 20)
    print("\n" + report.summary())
    assert report.n == CI_MUTANTS
    assert not report.failures, report.summary()
    # The run exercised both ends: files that load and run, and refusals of each kind.
    assert report.outcomes["loaded"] > CI_MUTANTS // 50
    assert report.errors["FormatError"] > 0 and report.errors["ModelError"] > 0
    assert set(report.kinds) >= {"bitflip", "insert", "delete", "truncate", "extreme",
                                 "offset", "type", "dims", "utf8", "semantic"}
    assert not list(work.glob("*.gguf")), "every mutant file is removed after its load"


# A target with failures planted in it: the fuzzer must see each, save the mutant, replace
# the worker and go on with the rest.
PLANTS = {b"PLANT-SEGV": "signal", b"PLANT-HANG": "hang", b"PLANT-KEYERROR": "foreign",
          b"PLANT-MEMORY": "foreign"}


def planted_target(path):
    blob = Path(path).read_bytes()
    if b"PLANT-SEGV" in blob:
        os.kill(os.getpid(), signal.SIGSEGV)
    if b"PLANT-HANG" in blob:
        time.sleep(3600)
    if b"PLANT-KEYERROR" in blob:
        raise KeyError("planted")
    if b"PLANT-MEMORY" in blob:
        raise MemoryError("planted")
    return gguf_fuzz.load_and_generate(path)


def test_planted_failures_are_caught_saved_and_survived(tmp_path):
    seeds = gguf_fuzz.make_seeds(tmp_path / "seeds")[:2]
    base = seeds[0].read_bytes()
    extra = [(f"planted {p.decode()}", base + p) for p in PLANTS]
    report = gguf_fuzz.run(seeds, 60, workdir=tmp_path, crashers=tmp_path / "crashers",
                           target="test_fuzz:planted_target", timeout=5, extra=extra)
    assert report.n == 60 + len(PLANTS)
    assert report.outcomes["signal"] == 1 and report.outcomes["hang"] == 1
    assert report.outcomes["foreign"] == 2
    found = {}
    for outcome, detail, saved in report.failures:
        blob = Path(saved).read_bytes()
        plant = next(p for p in PLANTS if p in blob)
        found[plant] = outcome
        assert blob == base + plant, "the saved mutant is the one that failed"
        note = Path(saved).with_suffix(".txt").read_text()
        assert outcome in note and "planted" in note
    assert found == PLANTS
    # (AddressSanitizer reports the SIGSEGV and aborts.)
    assert ("SIGABRT" if SANITIZED else "SIGSEGV") in " ".join(d for _, d, _ in report.failures)
    assert "KeyError" in " ".join(d for _, d, _ in report.failures)
    # The other 60 were judged normally by replacement workers.
    assert report.outcomes["loaded"] + report.outcomes["refused"] == 60


def test_the_field_map_finds_every_kind_of_field(tmp_path):
    seed = gguf_fuzz.make_seeds(tmp_path)[0]
    blob = seed.read_bytes()
    fm = gguf_fuzz.map_fields(blob)
    kinds = {f.kind for f in fm.fields}
    assert kinds == {"version", "n_tensors", "n_kv", "strlen", "arrlen", "vtype", "etype",
                     "ndims", "dim", "ttype", "offset"}
    with formats.read_gguf(seed) as f:
        assert fm.data_start == f.data_offset
        n_tokens = len(f.metadata["tokenizer.ggml.tokens"])
        first_offsets = sorted(t.offset for t in f.tensors.values())
    assert len(fm.token_strings) == n_tokens
    offsets = sorted(int.from_bytes(blob[x.pos:x.pos + 8], "little")
                     for x in fm.fields if x.kind == "offset")
    assert [o + fm.data_start for o in offsets] == first_offsets


# --- what earlier runs found ----------------------------------------------------------------

def _rewrite(src, out, **changes):
    with formats.read_gguf(src) as f:
        md = f.metadata.copy()
        ts = [(t.name, t.type, tuple(t.shape), t.data.copy()) for t in f.tensors.values()]
    md.update(changes)
    formats.write_gguf(out, md, ts)
    return str(out)


def test_a_sentencepiece_vocabulary_with_bytes_that_are_not_utf8_loads_and_runs(tmp_path):
    src = make_tiny_llama(tmp_path / "m.gguf", vocab="llama")
    with formats.read_gguf(src) as f:
        toks = [t.encode("utf-8", "surrogateescape") for t in f.metadata["tokenizer.ggml.tokens"]]
        types = list(f.metadata["tokenizer.ggml.token_type"])
    for i in range(300, 320):
        toks[i] += b"\xff\xc3"
        types[i] = 4  # user-defined: split out of raw text, sorted by byte length
    path = _rewrite(src, tmp_path / "bad.gguf", **{"tokenizer.ggml.tokens": toks,
                                                    "tokenizer.ggml.token_type": types})
    with LLM(path, n_ctx=64) as llm:
        out = llm.generate("Hello world", max_tokens=3, temperature=0)
        assert len(out.tokens) == 3 or out.finish_reason == "stop"


def test_a_wild_block_count_is_refused_at_once(tmp_path):
    src = make_tiny_llama(tmp_path / "m.gguf")
    path = _rewrite(src, tmp_path / "bad.gguf",
                    **{"llama.block_count": formats.GGUFValue(2**63, formats.GGUFValueType.UINT64)})
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="block_count 9223372036854775808 is more than the 512"):
        LLM(path, n_ctx=64)
    assert time.perf_counter() - t0 < 5


def test_a_zero_training_context_is_refused(tmp_path):
    src = make_tiny_llama(tmp_path / "m.gguf")
    path = _rewrite(src, tmp_path / "bad.gguf", **{"llama.context_length": 0})
    with pytest.raises(ModelError, match="n_ctx_train = 0"):
        LLM(path, n_ctx=64)


def test_a_vocabulary_that_encodes_text_to_nothing_is_the_models_fault(tmp_path):
    src = make_tiny_llama(tmp_path / "m.gguf")
    with formats.read_gguf(src) as f:
        n = len(f.metadata["tokenizer.ggml.tokens"])
    path = _rewrite(src, tmp_path / "bad.gguf", **{"tokenizer.ggml.tokens": [""] * n})
    with LLM(path, n_ctx=64) as llm:
        with pytest.raises(ModelError, match="vocabulary encodes the prompt 'Hello' to no tokens"):
            llm.generate("Hello", max_tokens=2)
        # The model itself still runs from token ids.
        assert llm.generate([1, 2, 3], max_tokens=2, temperature=0, ignore_eos=True).tokens


def test_the_fuzz_tool_replays_a_saved_mutant(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fuzz_gguf", Path(__file__).parent.parent / "tools" / "fuzz_gguf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    src = make_tiny_llama(tmp_path / "m.gguf")
    assert tool.main(["--replay", src]) == 0
    assert capsys.readouterr().out.strip() == "loaded"
    blob = bytearray(Path(src).read_bytes())
    blob[4:8] = struct.pack("<I", 99)  # version 99
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(blob)
    with pytest.raises(formats.FormatError, match="version"):
        tool.main(["--replay", str(bad)])
