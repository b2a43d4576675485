#!/usr/bin/env python3
"""Convert a Hugging Face Llama checkpoint or a GGUF file to GGUF (= `kiln convert`).

    python tools/convert.py SRC -o OUT.gguf --type TYPE      (--help lists the types)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
