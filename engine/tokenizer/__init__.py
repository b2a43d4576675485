"""Tokenizers built from a GGUF file's vocabulary, matching llama.cpp token for token.

    tok = load_tokenizer(gguf.metadata)
    ids = tok.encode("Hello")                      # BOS as the file says
    ids = tok.encode(chat_prompt, special=True)    # <|im_start|> etc. become single tokens
    tok.decode(ids); dec = tok.streaming_decoder(); dec.feed(id) ...; dec.flush()

tokenizer.ggml.model "llama" is SentencePiece (spm.py), "gpt2" is byte-level BPE (bpe.py);
vocab.py reads the vocabulary and special tokens, base.py holds what both share.
"""
from ..errors import ModelError
from .base import StreamingDecoder, Tokenizer
from .bpe import BPETokenizer, pre_tokenizer_settings
from .spm import SPMTokenizer
from .vocab import Vocab

__all__ = ["Tokenizer", "StreamingDecoder", "load_tokenizer"]


def load_tokenizer(md) -> Tokenizer:
    """The tokenizer tokenizer.ggml.model names: "llama" (SentencePiece) or "gpt2"
    (byte-level BPE with the pre-tokenizer tokenizer.ggml.pre names)."""
    model = md.get("tokenizer.ggml.model")
    if model == "llama":
        # llama.cpp's SPM defaults: BOS 1, EOS 2, UNK 0, BOS added, dummy-prefix space.
        vocab = Vocab.from_metadata(md, default_add_bos=True,
                                    default_ids={"bos": 1, "eos": 2, "unk": 0})
        vocab.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        return SPMTokenizer(vocab)
    if model == "gpt2":
        regexes, ignore_merges, add_bos = pre_tokenizer_settings(md.get("tokenizer.ggml.pre", ""))
        vocab = Vocab.from_metadata(md, default_add_bos=add_bos,
                                    default_ids={"bos": 11, "eos": 11})
        return BPETokenizer(vocab, regexes, ignore_merges)
    if model is None:
        raise ModelError("the model file has no tokenizer (tokenizer.ggml.model is missing)")
    raise ModelError(f"tokenizer.ggml.model {model!r} is not supported "
                     "(kiln reads 'llama' = SentencePiece and 'gpt2' = byte-level BPE)")
