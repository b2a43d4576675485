"""The C type table (ckernels/src/type_traits.c) agrees with formats' size table, and the
kernels refuse a type the table does not list as a weight type."""
import numpy as np
import pytest

import ckernels
import formats
from engine import model, reference
from formats import GGMLType


def test_c_table_agrees_with_formats_sizes_and_names():
    types = ckernels.block_types()
    assert len({b.ggml_id for b in types}) == len(types)
    for b in types:
        t = GGMLType(b.ggml_id)
        assert t.name == b.name
        assert formats.GGML_QUANT_SIZES[t] == (b.block_size, b.type_size), b.name
        assert ckernels._ext.codec_row_size(b.ggml_id, 4 * b.block_size) == 4 * b.type_size


def test_weight_types_pair_with_a_known_activation_format():
    names = {b.name: b for b in ckernels.block_types()}
    for b in ckernels.weight_types():
        if b.block_size == 1:  # float weights, float activations
            assert b.act_type is None and not b.repacked
        else:
            act = names[b.act_type]
            assert act.block_size == b.block_size
            # the super-block types (Q8_K activations) are read in place, the others repacked
            assert b.repacked == (b.act_type != "Q8_K"), b.name


def test_python_lists_follow_the_c_table():
    weights = ckernels.weight_types()
    assert model.MATRIX_TYPES == tuple(GGMLType(b.ggml_id) for b in weights)
    assert set(model.REPACKED_TYPES) == {GGMLType(b.ggml_id) for b in weights if b.repacked}
    assert {t.name: a.name for t, a in reference.ACTIVATION_TYPE.items()} == \
        {b.name: b.act_type for b in weights if b.act_type}


@pytest.mark.parametrize("type_id", [int(GGMLType.Q8_K), int(GGMLType.Q8_1), 4, 999, -1])
def test_matrix_refuses_a_type_that_is_not_a_weight_type(type_id):
    data = np.zeros(4 * 64, np.uint8)
    with pytest.raises(ValueError, match=rf"unsupported weight type .*ggml type {type_id}\b"):
        ckernels.Matrix(type_id, 4, 64, data)


def test_thread_limit_is_refused_with_its_value():
    limit = ckernels.MAX_THREADS
    assert ckernels.Pool(2).n_threads == 2
    with pytest.raises(ValueError, match=rf"between 1 and {limit}.*got {limit + 1}"):
        ckernels.Pool(limit + 1)
    with pytest.raises(ValueError, match="n_threads"):
        ckernels.Pool(0)
