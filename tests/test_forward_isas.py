"""The whole forward pass under every ISA variant this CPU runs (the list comes from
/proc/cpuinfo, not from the code under test), for every weight type the engine runs:
with block-quantized weights the logits equal the NumPy reference bit for bit on every
variant, batched and token by token; with float weights every variant stays within
rounding of the scalar one (float products are summed in each variant's own order)."""
import numpy as np
import pytest

import ckernels
from cpu_isas import expected_isas
from engine.model import MATRIX_TYPES, Model
from engine.reference import ReferenceModel
from formats import FLOAT_TYPES
from tiny_models import SUPER_BLOCK_SHAPE, make_tiny_llama, needs_super_blocks

N_TOKENS = 21  # not a multiple of any tile: every variant's tails run


def run(path, isa, tokens):
    ckernels.set_isa(isa)
    with Model(path, n_ctx=32, n_threads=2, n_batch=8) as m:
        batched = m.eval(tokens, 0, logits_all=True)
        single = np.stack([m.eval(tokens[i:i + 1], i) for i in range(len(tokens))])
    return batched, single


@pytest.mark.parametrize("wtype", MATRIX_TYPES, ids=lambda t: t.name)
def test_every_isa_runs_the_forward_pass(tmp_path, wtype, isa_restored):
    shape = (SUPER_BLOCK_SHAPE if needs_super_blocks(wtype)
             else dict(n_embd=96, n_head=6, n_head_kv=2, head_dim=16, n_ff=160))
    path = make_tiny_llama(tmp_path / "m.gguf", n_layer=2, ftype=wtype.name.lower(), seed=11, **shape)
    ref = ReferenceModel(path)
    tokens = np.random.default_rng(5).integers(0, ref.config.n_vocab, N_TOKENS)
    want = ref(tokens)
    scalar, _ = run(path, "scalar", tokens)
    for isa in expected_isas():
        batched, single = run(path, isa, tokens)
        if wtype in FLOAT_TYPES:
            tol = 1e-4 * np.abs(scalar).max()
            np.testing.assert_allclose(batched, scalar, rtol=0, atol=tol, err_msg=isa)
            np.testing.assert_allclose(single, scalar, rtol=0, atol=tol, err_msg=isa)
        else:
            np.testing.assert_array_equal(batched, want, err_msg=isa)
            np.testing.assert_array_equal(single, want, err_msg=isa)
