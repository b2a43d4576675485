"""Tokenizers built from a GGUF file's vocabulary, matching llama.cpp token for token.

    tok = Tokenizer.from_metadata(gguf.metadata)
    ids = tok.encode("Hello")                      # BOS as the file says
    ids = tok.encode(chat_prompt, special=True)    # <|im_start|> etc. become single tokens
    tok.decode(ids); dec = tok.streaming_decoder(); dec.feed(id) ...; dec.flush()

tokenizer.ggml.model "llama" is SentencePiece (spm.py), "gpt2" is byte-level BPE (bpe.py).
"""
from __future__ import annotations

from ..errors import ModelError
from .base import BaseTokenizer, StreamingDecoder
from .vocab import Vocab

__all__ = ["Tokenizer", "StreamingDecoder"]


class Tokenizer(BaseTokenizer):
    """Namespace for from_metadata(); the instances are SPMTokenizer or BPETokenizer."""

    def __init__(self, *args, **kwargs):
        raise TypeError("use Tokenizer.from_metadata(metadata)")

    @staticmethod
    def from_metadata(md) -> BaseTokenizer:
        model = md.get("tokenizer.ggml.model")
        if model == "llama":
            from .spm import SPMTokenizer
            # llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0, BOS added, dummy-prefix space.
            vocab = Vocab.from_metadata(md, default_add_bos=True,
                                        default_ids={"bos": 1, "eos": 2, "unk": 0})
            vocab.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            return SPMTokenizer(vocab)
        if model == "gpt2":
            from .bpe import BPETokenizer, pre_tokenizer_settings
            regexes, ignore_merges, add_bos = pre_tokenizer_settings(md.get("tokenizer.ggml.pre", ""))
            vocab = Vocab.from_metadata(md, default_add_bos=add_bos,
                                        default_ids={"bos": 11, "eos": 11})
            return BPETokenizer(vocab, regexes, ignore_merges)
        if model is None:
            raise ModelError("the model file has no tokenizer (tokenizer.ggml.model is missing)")
        raise ModelError(f"tokenizer.ggml.model {model!r} is not supported "
                         "(kiln reads 'llama' = SentencePiece and 'gpt2' = byte-level BPE)")
