"""tokenizer.ggml.model == "gpt2": byte-level BPE, through the `tokenizers` library.

Text is split by the pre-tokenizer regexes that tokenizer.ggml.pre names (each regex splits
every piece the previous one left, keeping matches and the text between them, as llama.cpp's
unicode_regex_split does), each piece is mapped byte by byte to GPT-2's printable characters,
and the merges are applied in rank order.
"""
from __future__ import annotations

from tokenizers import Regex, Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ..errors import ModelError
from .base import Tokenizer, is_unicode, token_bytes
from .vocab import Vocab

# The regexes of llama.cpp's llm_tokenizer_bpe, by pre-tokenizer family.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")

# tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos default), as llama_vocab::load maps it.
_FAMILIES = {
    "default": (DEFAULT, False, False),
    "llama3": ((LLAMA3,), True, True),
    "dbrx": ((LLAMA3,), False, False),
    "gpt2": ((GPT2,), False, False),
    "starcoder": ((r"\p{N}", GPT2), False, False),
    "qwen2": ((QWEN2,), False, False),
}
PRE_TOKENIZERS = {
    "default": "default",
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano"], "llama3"),
    **dict.fromkeys(["dbrx", "smaug-bpe"], "dbrx"),
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                     "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4", "mpt", "olmo",
                     "jais", "trillion", "granite-docling"], "gpt2"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                     "minerva-7b", "mellum2"], "starcoder"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2",
                     "hunyuan", "solar-open"], "qwen2"),
}


def pre_tokenizer_settings(pre) -> tuple[tuple[str, ...], bool, bool]:
    """(regexes, ignore_merges, add_bos default) for a tokenizer.ggml.pre value."""
    pre = pre or "default"  # llama.cpp falls back to 'default' (with a loud warning)
    family = PRE_TOKENIZERS.get(pre)
    if family is None:
        raise ModelError(f"unknown pre-tokenizer tokenizer.ggml.pre = {pre!r}; kiln knows "
                         + ", ".join(sorted(PRE_TOKENIZERS)))
    return _FAMILIES[family]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (so that BPE tokens are text)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
# str.translate table taking each GPT-2 character to the code point of its byte (then latin-1)
_TO_LATIN1 = {ord(c): b for c, b in CHAR_TO_BYTE.items()}


class BPETokenizer(Tokenizer):
    def __init__(self, vocab: Vocab, regexes, ignore_merges: bool):
        super().__init__(vocab)
        if not vocab.merges:
            raise ModelError("byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
        ranks = {}
        for rank, merge in enumerate(vocab.merges):
            # llama.cpp splits at the first space after the first character
            pos = merge.find(" ", 1)
            if pos < 0:
                continue
            pair = (merge[:pos], merge[pos + 1:])
            # the first rank of a pair wins; a merge of texts the vocabulary lacks can never
            # produce a token (and `tokenizers` refuses it)
            if pair not in ranks and pair[0] in vocab.token_to_id and \
                    pair[1] in vocab.token_to_id and pair[0] + pair[1] in vocab.token_to_id:
                ranks[pair] = rank
        merges = sorted(ranks, key=ranks.get)
        # A token whose file bytes are not UTF-8 (a malformed byte-level vocabulary: its
        # strings are GPT-2 characters) can never match text; it still decodes to its bytes.
        matchable = {t: i for t, i in vocab.token_to_id.items() if is_unicode(t)}
        merges = [m for m in merges if is_unicode(m[0]) and is_unicode(m[1])]
        model = models.BPE(vocab=matchable, merges=merges,
                           ignore_merges=ignore_merges, fuse_unk=False, byte_fallback=False)
        self._hf = HFTokenizer(model)
        self._hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def _normal_piece(self, text: str) -> bytes:
        try:
            return text.translate(_TO_LATIN1).encode("latin-1")
        except UnicodeEncodeError:
            # characters outside GPT-2's table (a malformed vocabulary) keep their UTF-8 bytes
            return b"".join(bytes([CHAR_TO_BYTE[c]]) if c in CHAR_TO_BYTE else token_bytes(c)
                            for c in text)
