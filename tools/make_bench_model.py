"""Build the 1B-class benchmark model: random weights with TinyLlama-1.1B's shapes (22
layers, width 2048, 32 query / 4 KV heads, FFN 5632) and SmolLM2's 49k-token vocabulary
and chat template (taken from the shipped SmolLM2 file, so the model chats and serves
like any other), written as a BF16 safetensors checkpoint and converted by kiln.

    python tools/make_bench_model.py [--types q4_0 q8_0 q4_k_m] [--dir ~/.cache/kiln/bench1b]

Files already built are kept (a fixture built once and cached, never in git); prints the
GGUF paths. Random weights generate random text, which runs to max_tokens: what a speed
benchmark wants. Small models are compute-bound on a few cores; at this size generation
is bound by reading the weights, which is where batching and kernels show.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, head_dim=64)


def write_checkpoint(out_dir, seed=0):
    """SmolLM2's tokenizer files and a config with TinyLlama's shapes, random BF16 weights."""
    from engine.cli.pull import default_model_path
    from engine.convert.export_hf import export
    export(default_model_path(), out_dir, dtype="bf16")
    os.remove(os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(SHAPE, tie_word_embeddings=False, _name_or_path="kiln-bench-1b (random weights)")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    d, ff, kv, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], \
        SHAPE["num_key_value_heads"] * SHAPE["head_dim"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff)})
    _write_bf16_safetensors(os.path.join(out_dir, "model.safetensors"), shapes,
                            np.random.default_rng(seed))


def _write_bf16_safetensors(path, shapes, rng):
    """The safetensors layout written directly (an 8-byte header length, a JSON header,
    the raw tensors), one tensor in memory at a time: numpy has no bfloat16, so the
    float32 draws are truncated to their upper 16 bits, which is BF16. Norm weights are
    1, matrices N(0, 0.02)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in shapes.items():
            if len(shape) == 1:
                x = np.ones(shape, dtype=np.float32)
            else:
                x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=["q4_0", "q8_0", "q4_k_m"])
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/kiln/bench1b"))
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    outs = {t: os.path.join(args.dir, f"bench-1b.{t.upper()}.gguf") for t in args.types}
    missing = [t for t, p in outs.items() if not os.path.exists(p)]
    if missing:
        with tempfile.TemporaryDirectory(dir=args.dir) as ckpt:
            write_checkpoint(ckpt)
            for t in missing:
                tmp = outs[t] + ".part"
                subprocess.run([sys.executable, "-m", "engine", "convert", ckpt, "-o", tmp,
                                "--type", t, "--quiet"], check=True)
                os.replace(tmp, outs[t])
    for p in outs.values():
        print(p)


if __name__ == "__main__":
    main()
