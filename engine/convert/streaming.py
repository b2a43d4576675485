"""Writing a conversion plan: tensors streamed in chunks of rows through
formats.GGUFWriter (atomic), with a progress bar and the error of each tensor."""
from __future__ import annotations

import sys

import numpy as np

import formats
from engine.convert.plan import Plan, TensorPlan

GGMLType = formats.GGMLType


CHUNK_BYTES = 16 << 20  # float32 rows converted at a time: bounds the temporaries


def encode_rows(x: np.ndarray, t: GGMLType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 rows -> raw bytes of type t, row for row (uint8, (rows, row bytes)); with
    importance weights (n,), as ggml_quantize_chunk does with them."""
    if imatrix is not None:
        return formats.quantize_weighted(x, t, imatrix)
    return formats.quantize(x, t)


def decode_rows(q: np.ndarray, t: GGMLType, shape) -> np.ndarray:
    return formats.dequantize(q, t, shape)


def convert_tensor(w, tp: TensorPlan, want_rmse: bool, progress=lambda n: None) -> float:
    """Write tensor tp into GGUFWriter w in its output type, one chunk of rows at a time
    (read from the memory-mapped source, encoded, written, its source pages released), so
    memory holds one chunk, never the whole tensor in either type. Returns the RMSE."""
    if tp.raw is not None:
        w.write_tensor(tp.name, tp.raw())  # the writer copies it in bounded pieces
        progress(tp.out_nbytes)
        return 0.0
    n = tp.shape[-1] if tp.shape else 1
    n_rows = tp.n_elements // n if n else 0
    step = max(1, CHUNK_BYTES // (4 * max(1, n)))
    sq_err = 0.0
    solver = None
    if tp.hessian is not None:
        from engine.convert.gptq import GPTQ
        solver = GPTQ(tp.hessian, tp.out_type)
        step = max(1, step // 4)  # its float64 copy and updates are larger than the rows
    for i in range(0, n_rows, step):
        j = min(n_rows, i + step)
        x = tp.read_rows(i, j).reshape(j - i, n)
        q = solver.quantize(x, i, n_rows) if solver else encode_rows(x, tp.out_type, tp.imatrix)
        if want_rmse and tp.out_type != GGMLType.F32:
            d = decode_rows(q, tp.out_type, (j - i, n)) - x
            sq_err += float(np.dot(d.ravel(), d.ravel()))
        w.write_tensor_chunk(tp.name, q.view(np.uint8).reshape(-1))
        progress(q.nbytes)
        del x, q
        tp.release(i, j)
    if n_rows == 0:
        w.write_tensor(tp.name, np.zeros(0, np.uint8))  # an empty tensor still takes its turn
    return (sq_err / max(1, tp.n_elements)) ** 0.5


def _key_type(t) -> tuple:
    if t is None:
        return ()
    return tuple(t) if isinstance(t, tuple) else (t,)


def grouped_notes(tensors) -> list[str]:
    """The plan's per-tensor notes ("note: NAME: what happened"), one line per distinct
    happening with its count and first tensor: a K-quant mix of a model whose width is
    not a multiple of 256 would otherwise print one line per matrix."""
    groups: dict[str, list[str]] = {}
    for tp in tensors:
        if tp.note:
            prefix = f"note: {tp.name}: "
            what = tp.note[len(prefix):] if tp.note.startswith(prefix) else tp.note
            groups.setdefault(what, []).append(tp.name)
    lines = []
    for what, names in groups.items():
        who = names[0] if len(names) == 1 else f"{len(names)} tensors ({names[0]}, ...)"
        lines.append(f"note: {who}: {what}")
    return lines


def write(plan: Plan, out, quiet: bool = False) -> dict:
    """Stream the planned tensors into `out` (atomically) and return summary numbers."""
    from tqdm import tqdm
    for line in grouped_notes(plan.tensors):
        print(line, file=sys.stderr)
    total = sum(tp.out_nbytes for tp in plan.tensors)
    n_params = sum(tp.n_elements for tp in plan.tensors)
    with formats.GGUFWriter(out) as w:
        types = getattr(plan.metadata, "types", {})
        for key, value in plan.metadata.items():
            w.add_key(key, value, *_key_type(plan.types.get(key, types.get(key))))
        for tp in plan.tensors:
            w.add_tensor_info(tp.name, tp.out_type, tp.shape)
        w.write_header()
        width = max(len(tp.name) for tp in plan.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=quiet,
                  desc="writing", leave=False, file=sys.stderr) as bar:
            for k, tp in enumerate(plan.tensors):
                rmse = convert_tensor(w, tp, want_rmse=not quiet, progress=bar.update)
                if not quiet:
                    shape = "x".join(str(d) for d in tp.shape)
                    bar.write(f"[{k + 1:{len(str(len(plan.tensors)))}d}/{len(plan.tensors)}] "
                              f"{tp.name:<{width}} {shape:>12} {tp.src_type:>5} -> "
                              f"{tp.out_type.name:<5} rmse {rmse:.2e}", file=sys.stdout)
    return {"n_params": n_params, "tensor_bytes": total,
            "bpw": 8.0 * total / max(1, n_params)}

