"""tokenizer.ggml.model == "llama": SentencePiece, through the sentencepiece library.

The GGUF file keeps the vocabulary (pieces, scores, types) but not the SentencePiece model
file, so we rebuild a ModelProto from it. llama.cpp's SPM tokenizer merges the adjacent pair
whose merged piece has the highest score, which is exactly SentencePiece's BPE model, so the
proto is always a BPE model, whatever the original training algorithm was.
"""
from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from ..errors import ModelError
from .base import Tokenizer, is_unicode, token_bytes
from .vocab import (TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN,
                    TOKEN_TYPE_USER_DEFINED, Vocab)

SPACE = "\u2581"  # ▁, SentencePiece's escaped space
Piece = spm_pb2.ModelProto.SentencePiece


def _byte_piece(text: str) -> bool:
    return len(text) == 6 and text.startswith("<0x") and text.endswith(">") and \
        all(c in "0123456789ABCDEF" for c in text[3:5])


def build_model_proto(vocab: Vocab) -> spm_pb2.ModelProto:
    """A SentencePiece BPE model over the GGUF vocabulary, tokenizing as llama.cpp does."""
    m = spm_pb2.ModelProto()
    has_bytes = all(f"<0x{b:02X}>" in vocab.token_to_id for b in range(256))
    unk_seen = False
    for i, (text, score, kind) in enumerate(zip(vocab.tokens, vocab.scores, vocab.types)):
        if not is_unicode(text):
            # bytes that are not UTF-8 (a malformed file) can never match text, and a
            # SentencePiece piece must be Unicode: a placeholder keeps the id (the token
            # still decodes to the file's bytes)
            m.pieces.append(Piece(piece=f"<kiln-raw-{i}>", score=score, type=Piece.CONTROL))
            continue
        if kind == TOKEN_TYPE_UNKNOWN and not unk_seen:
            ptype, unk_seen = Piece.UNKNOWN, True
        elif kind == TOKEN_TYPE_CONTROL or kind == TOKEN_TYPE_UNKNOWN:
            ptype = Piece.CONTROL  # never produced from text
        elif kind == TOKEN_TYPE_USER_DEFINED:
            ptype = Piece.USER_DEFINED
        elif kind == TOKEN_TYPE_BYTE and has_bytes and _byte_piece(text):
            ptype = Piece.BYTE
        else:
            # Normal, and also unused/undefined: llama.cpp merges into any token whose text it
            # finds, where SentencePiece would re-split UNUSED pieces.
            ptype = Piece.NORMAL
        m.pieces.append(Piece(piece=text, score=score, type=ptype))
    if not unk_seen:
        # SentencePiece needs an unknown piece; this one can only come out for a character
        # that no piece and no byte covers, where llama.cpp itself fails.
        m.pieces.append(Piece(piece="<kiln-unk>", score=0.0, type=Piece.UNKNOWN))
    m.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(m.pieces)
    m.trainer_spec.byte_fallback = has_bytes
    m.trainer_spec.unk_id = next(i for i, p in enumerate(m.pieces) if p.type == Piece.UNKNOWN)
    m.trainer_spec.bos_id = -1 if vocab.bos_id is None else vocab.bos_id
    m.trainer_spec.eos_id = -1 if vocab.eos_id is None else vocab.eos_id
    m.trainer_spec.pad_id = -1
    # llama.cpp only escapes ' ' as ▁ and adds the dummy-prefix space itself (per fragment,
    # after special tokens too), so SentencePiece must not normalize anything.
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return m


class SPMTokenizer(Tokenizer):
    def __init__(self, vocab: Vocab):
        super().__init__(vocab)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(build_model_proto(vocab).SerializeToString())
        except (RuntimeError, OSError) as e:
            raise ModelError(f"SentencePiece rejected the vocabulary of this model: {e}") from e
        self._unk_fallback = vocab.unk_id if vocab.unk_id is not None else 0
        self._n = vocab.n_vocab

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        if self.vocab.add_space_prefix and after_special:
            text = " " + text
        ids = self._sp.EncodeAsIds(text)
        # the appended <kiln-unk> piece (if any) stands for the file's unknown token
        return [i if i < self._n else self._unk_fallback for i in ids]

    def _normal_piece(self, text: str) -> bytes:
        return token_bytes(text.replace(SPACE, " "))
