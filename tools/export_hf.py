#!/usr/bin/env python3
"""Write a llama GGUF file as a Hugging Face checkpoint directory.

    python tools/export_hf.py MODEL.gguf OUTDIR [--dtype f32|f16|bf16] [--shards N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli.export_hf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
