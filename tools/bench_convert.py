#!/usr/bin/env python3
"""Peak memory and time of converting a ~1 GB Hugging Face checkpoint.

Builds a random-weight BF16 Llama checkpoint of about 1 GB (SmolLM2's tokenizer, wide
layers, sharded in two files) in a temporary directory, converts it with
`tools/convert.py` in a child process for each --type, and reports the child's peak RSS
as a fraction of the checkpoint size (target: below 40%) and the wall time.

    python tools/bench_convert.py [--types q8_0,q4_0,f16] [--keep DIR]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import formats  # noqa: E402
from engine.convert.export_hf import bpe_tokenizer_json, tokenizer_config  # noqa: E402
from engine.cli.pull import pull  # noqa: E402
from formats.safetensors import write_safetensors  # noqa: E402


def build_checkpoint(d: Path, n_layer=7, n_embd=2048, n_ff=5632, n_head=16, n_head_kv=4):
    with formats.read_gguf(pull()) as f:
        md = f.metadata
        (d / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json(md)))
        (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(md, True)))
        n_vocab = len(md["tokenizer.ggml.tokens"])
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": n_embd, "intermediate_size": n_ff, "num_hidden_layers": n_layer,
           "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "vocab_size": n_vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (d / "config.json").write_text(json.dumps(cfg))
    kv = n_embd // n_head * n_head_kv
    shapes = {"model.embed_tokens.weight": (n_vocab, n_embd), "model.norm.weight": (n_embd,),
              "lm_head.weight": (n_vocab, n_embd)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (n_embd,),
                       p + "post_attention_layernorm.weight": (n_embd,),
                       p + "self_attn.q_proj.weight": (n_embd, n_embd),
                       p + "self_attn.k_proj.weight": (kv, n_embd),
                       p + "self_attn.v_proj.weight": (kv, n_embd),
                       p + "self_attn.o_proj.weight": (n_embd, n_embd),
                       p + "mlp.gate_proj.weight": (n_ff, n_embd),
                       p + "mlp.up_proj.weight": (n_ff, n_embd),
                       p + "mlp.down_proj.weight": (n_embd, n_ff)})
    rng = np.random.default_rng(0)

    def produce(shape):
        # random bf16 bits of modest magnitude, made without a float32 copy of the tensor
        return lambda: (rng.integers(0x3C00, 0x3D00, size=shape, dtype=np.uint16)
                        | (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15))

    names = list(shapes)
    half = len(names) // 2
    weight_map = {}
    for k, group in enumerate((names[:half], names[half:])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        write_safetensors(d / shard, [(n, "BF16", shapes[n], produce(shapes[n])) for n in group])
        weight_map.update({n: shard for n in group})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q8_0,q4_0,f16")
    ap.add_argument("--keep", help="build the checkpoint in this directory and keep it")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="kiln-bench-convert-")
    d = Path(args.keep) if args.keep else Path(tmp.name)
    d.mkdir(parents=True, exist_ok=True)
    size = build_checkpoint(d) if not (d / "config.json").exists() else sum(
        p.stat().st_size for p in d.glob("*.safetensors"))
    print(f"checkpoint: {size / 1e9:.2f} GB of BF16 safetensors in {d}")
    print(f"{'type':6} {'peak RSS':>10} {'ratio':>7} {'time':>7}  output")
    for typ in args.types.split(","):
        out = Path(tmp.name) / f"bench-{typ}.gguf"
        # each conversion in its own child, which reports VmHWM (its own peak RSS; ru_maxrss
        # would count this parent's memory, inherited through fork before exec)
        code = ("import sys; from engine.cli.convert import main; "
                "rc = main(sys.argv[1:]); "
                "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
                "print(hwm[0], file=sys.stderr); sys.exit(rc)")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code, str(d), "-o", str(out), "--type", typ,
                               "--quiet"], capture_output=True, text=True, cwd=REPO)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        peak = int(proc.stderr.strip().splitlines()[-1]) * 1024
        print(f"{typ:6} {peak / 2**20:8.0f} MiB {peak / size:6.1%} {dt:6.1f} s  "
              f"{out.stat().st_size / 2**20:.0f} MiB")
        out.unlink()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
