"""What both tokenizer kinds share: special-token partitioning, BOS/EOS, decoding to bytes and
streaming UTF-8 decoding. Subclasses (spm.SPMTokenizer, bpe.BPETokenizer) supply
`_encode_fragment` and `_normal_piece`."""
from __future__ import annotations

from .vocab import (TOKEN_TYPE_BYTE, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN,
                    TOKEN_TYPE_USER_DEFINED, Vocab)

C_SPACE = " \t\n\v\f\r"   # what C's isspace() takes, which llama.cpp strips with


class _Plain(str):
    """A fragment of text inside a plain span (Tokenizer._partition)."""


class Tokenizer:
    """A GGUF file's tokenizer; build it with engine.tokenizer.load_tokenizer(metadata)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._specials = {flag: vocab.special_tokens(flag) for flag in (False, True)}
        # token_to_piece(special=False) and (special=True) for every id, as llama.cpp caches it.
        self._pieces = [self._piece(i, special=False) for i in range(vocab.n_vocab)]
        self._pieces_special = list(self._pieces)
        for i, kind in enumerate(vocab.types):
            if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
                self._pieces_special[i] = self._piece(i, special=True)

    # -- the public interface (engine.tokenizer.Tokenizer) ---------------------------------

    @property
    def n_vocab(self) -> int:
        return self.vocab.n_vocab

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def eog_ids(self) -> frozenset:
        return self.vocab.eog_ids

    @property
    def add_bos(self) -> bool:
        """The file's default: does a prompt start with BOS?"""
        return self.vocab.add_bos

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.vocab.eog_ids

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. '▁the', 'Ġthe', '<|im_end|>')."""
        return self.vocab.tokens[self._check_id(token_id)]

    def special_token_id(self, text: str) -> int | None:
        """The id of the special token whose text is `text` (e.g. '<|im_end|>'), if there
        is one: such a token adds nothing to decoded text, so a stop string equal to its
        text has to be recognized by id."""
        ids = self.encode(text, add_bos=False, special=True)
        if len(ids) == 1 and not self.token_bytes(ids[0]) and self.token_text(ids[0]) == text:
            return ids[0]
        return None

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes the token adds to the text (llama_token_to_piece). Control tokens add
        nothing unless `special`; a byte token may be part of a multi-byte character."""
        pieces = self._pieces_special if special else self._pieces
        return pieces[self._check_id(token_id)]

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False,
               add_eos: bool | None = None, plain_spans=()) -> list[int]:
        """Token ids of `text`, as llama_tokenize gives them.

        add_bos / add_eos: None follows the file (tokenizer.ggml.add_bos_token/add_eos_token).
        special: parse control tokens such as <|im_start|> written in the text (chat
        templates); user text is tokenized with special=False so it cannot inject them.
        plain_spans: (start, end) ranges of text parsed as with special=False even when
        special is true (the messages inside a rendered chat prompt).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} "
                                 f"at position {e.start}") from None
        add_bos = self.vocab.add_bos if add_bos is None else add_bos
        add_eos = self.vocab.add_eos if add_eos is None else add_eos
        out = []
        if add_bos:
            out.append(self._required(self.vocab.bos_id, "BOS"))
        prev_special = True
        for frag in self._partition(text, special, plain_spans):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                out.extend(self._encode_fragment(frag, prev_special))
                prev_special = False
        if add_eos:
            out.append(self._required(self.vocab.eos_id, "EOS"))
        return out

    def decode(self, ids, special: bool = False) -> str:
        """The text of a whole token sequence. SentencePiece vocabularies drop the leading
        space that encode() added as a dummy prefix (the first token after an optional BOS),
        so that decode(encode(x)) == x. Bytes that are not valid UTF-8 become U+FFFD."""
        return self._decode_bytes(ids, special).decode("utf-8", errors="replace")

    def streaming_decoder(self, special: bool = False, strip_leading_space: bool = False):
        """A decoder that turns ids into text one at a time, holding back the bytes of a
        character split across tokens until it is complete. By default it continues a text
        (generation after a prompt: ' Paris' keeps its space); strip_leading_space=True
        decodes a text from its start exactly as decode() does."""
        return StreamingDecoder(self, special, strip_leading_space)

    # -- shared machinery -------------------------------------------------------------------

    def _check_id(self, token_id) -> int:
        i = int(token_id)
        if not 0 <= i < self.vocab.n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab.n_vocab - 1})")
        return i

    @staticmethod
    def _required(token_id, name):
        if token_id is None:
            raise ValueError(f"this vocabulary has no {name} token")
        return token_id

    def _partition(self, text: str, parse_special: bool, plain_spans=()) -> list:
        """Split text around special tokens, longest first (llama.cpp tokenizer_st_partition).
        Returns raw-text fragments (str) and token ids (int), in order. Within
        plain_spans ((start, end) ranges of text: message contents in a chat prompt) only
        the tokens special=False would split out are: there a control token's text is
        text, and the text around it is tokenized as if the span had no boundaries."""
        frags, at = [], 0
        for start, end in sorted(plain_spans):
            start, end = max(start, at), min(end, len(text))
            if start >= end:
                continue
            if start > at:
                frags.append(text[at:start])
            frags.append(_Plain(text[start:end]))
            at = end
        if at < len(text):
            frags.append(text[at:])
        always = {t for t, _ in self._specials[False]}
        for tok_text, tok_id in self._specials[parse_special]:
            in_plain = tok_text in always
            if not any(isinstance(f, str) and tok_text in f for f in frags):
                continue
            split = []
            for f in frags:
                if isinstance(f, int) or tok_text not in f or (isinstance(f, _Plain) and not in_plain):
                    split.append(f)
                    continue
                for k, part in enumerate(f.split(tok_text)):
                    if k:
                        split.append(tok_id)
                        if tok_id in self.vocab.rstrip_ids:
                            part = part.lstrip(C_SPACE)
                    if part:
                        split.append(_Plain(part) if isinstance(f, _Plain) else part)
            frags = split
        merged = []  # a span's edges are no fragment boundaries: neighbouring text joins up
        for f in frags:
            if isinstance(f, str) and merged and isinstance(merged[-1], str):
                merged[-1] = str(merged[-1]) + f
            else:
                merged.append(str(f) if isinstance(f, str) else f)
        return merged

    def _piece(self, i: int, special: bool) -> bytes:
        kind = self.vocab.types[i]
        text = self.vocab.tokens[i]
        if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
            return token_bytes(text) if special else b""
        if kind == TOKEN_TYPE_USER_DEFINED:
            return token_bytes(text)
        if kind == TOKEN_TYPE_NORMAL:
            return self._normal_piece(text)
        if kind == TOKEN_TYPE_BYTE:
            return _byte_token_value(text, fallback=self._normal_piece)
        return b""  # unused and undefined tokens render as nothing, as in llama.cpp

    def _strips_leading_space(self) -> bool:
        return self.vocab.add_space_prefix

    def _decode_bytes(self, ids, special: bool) -> bytes:
        pieces = self._pieces_special if special else self._pieces
        out = []
        strip = self._strips_leading_space()
        for k, token_id in enumerate(ids):
            piece = pieces[self._check_id(token_id)]
            if strip and not (k == 0 and token_id == self.vocab.bos_id):
                if piece.startswith(b" "):
                    piece = piece[1:]
                strip = False
            out.append(piece)
        return b"".join(out)

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        raise NotImplementedError

    def _normal_piece(self, text: str) -> bytes:
        raise NotImplementedError


def token_bytes(text: str) -> bytes:
    """A vocabulary string's bytes as the file holds them: the reader keeps bytes that
    are not UTF-8 as surrogate escapes, and llama.cpp renders such a token's raw bytes."""
    return text.encode("utf-8", "surrogateescape")


def is_unicode(text: str) -> bool:
    """False for a vocabulary string holding the reader's escapes of non-UTF-8 bytes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _byte_token_value(text: str, fallback) -> bytes:
    """<0xNN> -> the byte NN."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return fallback(text)


def _incomplete_utf8_tail(buf: bytes) -> int:
    """How many bytes at the end of buf start a UTF-8 character that is not complete yet."""
    # Walk back over at most 3 continuation bytes to the lead byte of the last character.
    for back in range(1, min(4, len(buf)) + 1):
        b = buf[-back]
        if b & 0xC0 == 0x80:
            continue  # continuation byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return back if back < need else 0
    return 0


class StreamingDecoder:
    """feed(id) -> the text that became complete; flush() -> whatever is left (as U+FFFD if it
    never completed)."""

    def __init__(self, tokenizer: Tokenizer, special: bool, strip_leading_space: bool):
        self._tokenizer = tokenizer
        self._special = special
        self._strip = strip_leading_space and tokenizer._strips_leading_space()
        self._first = True
        self._pending = b""

    def feed(self, token_id: int) -> str:
        piece = self._tokenizer.token_bytes(token_id, self._special)
        if self._strip and not (self._first and token_id == self._tokenizer.bos_id):
            if piece.startswith(b" "):
                piece = piece[1:]
            self._strip = False
        self._first = False
        buf = self._pending + piece
        keep = _incomplete_utf8_tail(buf)
        self._pending = buf[len(buf) - keep:] if keep else b""
        return buf[:len(buf) - keep].decode("utf-8", errors="replace")

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text
