"""kiln's library: `from engine import LLM`.

`LLM` is imported lazily, so `import engine.errors` (or the CLI's `--help`) does not load
the model code and its C extension.
"""
__all__ = ["LLM", "Completion", "Timings"]


def __getattr__(name):
    if name in __all__:
        from engine import llm
        return getattr(llm, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
