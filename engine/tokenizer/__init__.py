"""Tokenizers built from a GGUF file's vocabulary, matching llama.cpp token for token.

    tok = Tokenizer.from_metadata(gguf.metadata)
    ids = tok.encode("Hello")                      # BOS as the file says
    ids = tok.encode(chat_prompt, special=True)    # <|im_start|> etc. become single tokens
    tok.decode(ids); dec = tok.streaming_decoder(); dec.feed(id) ...; dec.flush()

tokenizer.ggml.model "llama" is SentencePiece (spm.py), "gpt2" is byte-level BPE (bpe.py);
vocab.py reads the vocabulary and special tokens, base.py holds what both share.
"""
from .base import StreamingDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamingDecoder"]
