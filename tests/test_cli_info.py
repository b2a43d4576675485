"""`kiln info` on the real SmolLM2 file, checked against gguf-py as the outside oracle,
and its errors on files that are not models."""
import collections
import json
import os

import pytest

from engine.cli import kiln as cli

import formats


def test_info_json_matches_gguf_py(smollm2_path, capsys):
    gguf = pytest.importorskip("gguf", reason="gguf-py is the oracle")
    assert cli.main(["info", smollm2_path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    r = gguf.GGUFReader(smollm2_path)
    types = collections.Counter(t.tensor_type.name for t in r.tensors)
    n_params = sum(int(t.n_elements) for t in r.tensors)
    n_bytes = sum(int(t.n_bytes) for t in r.tensors)
    assert info["architecture"] == "llama"
    assert info["file_size"] == os.path.getsize(smollm2_path) == 98_362_432
    assert info["n_tensors"] == len(r.tensors) == 272
    assert info["tensor_types"] == dict(types) == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    file_type = r.fields["general.file_type"]
    assert info["file_type"] == int(file_type.parts[file_type.data[0]][0]) == 3
    assert info["file_type_name"] == "Q4_1"
    assert info["n_params"] == n_params
    assert info["bits_per_weight"] == pytest.approx(n_bytes * 8 / n_params, abs=1e-3)
    h = info["hparams"]
    assert (h["n_layer"], h["n_embd"], h["n_head"], h["n_head_kv"], h["n_ff"], h["n_ctx_train"],
            h["n_vocab"], h["head_dim"], h["n_rot"]) == (30, 576, 9, 3, 1536, 8192, 49152, 64, 64)
    assert h["rope_freq_base"] == 100000.0
    tok = info["tokenizer"]
    assert (tok["model"], tok["kind"], tok["n_tokens"], tok["n_merges"]) == ("gpt2", "byte-level BPE",
                                                                             49152, 48900)
    assert info["chat_template"] == "chatml"
    import ckernels
    assert info["isa"]["active"] == ckernels.active_isa()
    assert info["isa"]["active"] in info["isa"]["supported"]


def test_info_text(smollm2_path, capsys):
    assert cli.main(["info", smollm2_path]) == 0
    out = capsys.readouterr().out
    for text in ("architecture:  llama", "n_layer:", "byte-level BPE", "tensors:       272",
                 "file type:     Q4_1 (general.file_type 3)",
                 "Q4_1: 210", "bits/weight:   5.744", "kernel ISA:"):
        assert text in out, text


def test_info_on_files_that_are_not_models(tmp_path, smollm2_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(1000))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (junk, cut, empty):
        assert cli.main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("kiln: error: ") and err.count("\n") == 1, err
        assert "internal error" not in err


def test_file_type_names_are_llama_cpps():
    from engine.cli.info import file_type_name
    assert [file_type_name(v) for v in (0, 1, 15, 18, 30, 32)] == [
        "F32", "F16", "Q4_K_M", "Q6_K", "IQ4_XS", "BF16"]
    assert file_type_name(None) is None and file_type_name(4) is None and file_type_name("x") is None
