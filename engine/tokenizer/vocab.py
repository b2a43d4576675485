"""The GGUF vocabulary as llama.cpp loads it (llama-vocab.cpp): token texts, scores and types,
special token ids and the end-of-generation set, with llama.cpp's defaults and fix-ups (tokens
that look like control tokens are made control tokens, whatever the file says).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError

# tokenizer.ggml.token_type values (llama.h: llama_token_type)
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Texts llama.cpp treats as end-of-generation whatever the file says (llama-vocab.cpp: the
# "special_eog_ids" loop). A model trained for chat ends its turn with one of these.
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
])
# Texts llama.cpp recognises as the end-of-turn / end-of-message / fill-in-the-middle tokens when
# the file names none; fim pad/repo/sep also end generation.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
             "<end_of_utterance>")
EOM_TEXTS = ("<|eom_id|>",)
FIM_PRE_TEXTS = ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                 "▁<PRE>", "<|code_prefix|>", "<|prefix|>")
FIM_SUF_TEXTS = ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                 "▁<SUF>", "<|code_suffix|>", "<|suffix|>")
FIM_MID_TEXTS = ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                 "▁<MID>", "<|code_middle|>", "<|middle|>")
FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
FIM_SEP_TEXTS = ("<|file_sep|>",)
# tokenizer.ggml.<key> -> special id, in llama.cpp's order (the deprecated fill-in-the-middle
# names come last and win)
SPECIAL_ID_KEYS = (
    ("bos", "bos_token_id"), ("eos", "eos_token_id"), ("eot", "eot_token_id"),
    ("eom", "eom_token_id"), ("unk", "unknown_token_id"), ("fim_pre", "fim_pre_token_id"),
    ("fim_suf", "fim_suf_token_id"), ("fim_mid", "fim_mid_token_id"),
    ("fim_pad", "fim_pad_token_id"), ("fim_rep", "fim_rep_token_id"),
    ("fim_sep", "fim_sep_token_id"), ("fim_pre", "prefix_token_id"),
    ("fim_suf", "suffix_token_id"), ("fim_mid", "middle_token_id"),
)
# gpt-oss: always rendered, and split out of any text, like user-defined tokens.
ALWAYS_RENDERED_TEXTS = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _key(md, name, default=None):
    return md.get(f"tokenizer.ggml.{name}", default)


def _as_list(value, key):
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise ModelError(f"GGUF key {key} should be an array, found a string")
    return list(value.tolist() if isinstance(value, np.ndarray) else value)


def _as_text(value, key):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"GGUF key {key} holds a string that is not valid UTF-8") from None
    if not isinstance(value, str):
        raise ModelError(f"GGUF key {key} should hold strings, found {type(value).__name__}")
    return value


@dataclass
class Vocab:
    """What llama.cpp's llama_vocab::impl::load() reads, with the same defaults and fix-ups."""

    model: str                      # tokenizer.ggml.model: "llama" or "gpt2"
    pre: str                        # tokenizer.ggml.pre ("" when absent)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    eog_ids: frozenset = frozenset()
    token_to_id: dict = field(default_factory=dict)
    rstrip_ids: frozenset = frozenset()   # special tokens that eat the whitespace after them

    @classmethod
    def from_metadata(cls, md, *, default_add_bos: bool, default_ids: dict):
        model = _as_text(_key(md, "model", ""), "tokenizer.ggml.model")
        tokens = _as_list(_key(md, "tokens"), "tokenizer.ggml.tokens")
        if not tokens:
            raise ModelError("the model file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        tokens = [_as_text(t, "tokenizer.ggml.tokens") for t in tokens]
        n = len(tokens)
        scores = _as_list(_key(md, "scores"), "tokenizer.ggml.scores")
        types = _as_list(_key(md, "token_type"), "tokenizer.ggml.token_type")
        if scores is not None and len(scores) < n:
            raise ModelError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        if types is not None and len(types) < n:
            raise ModelError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        scores = [float(s) for s in scores[:n]] if scores is not None else [0.0] * n
        types = [int(t) for t in types[:n]] if types is not None else [TOKEN_TYPE_NORMAL] * n

        token_to_id = {}
        for i, text in enumerate(tokens):
            if text == "":
                # llama.cpp renames empty tokens so that every text maps to one id.
                text = tokens[i] = f"[EMPTY_{i}]"
            if token_to_id.setdefault(text, i) != i:
                raise ModelError(f"duplicate token in vocabulary: {text!r} has ids "
                                 f"{token_to_id[text]} and {i}")

        merges = _as_list(_key(md, "merges"), "tokenizer.ggml.merges") or []
        v = cls(model=model, pre=_as_text(_key(md, "pre", ""), "tokenizer.ggml.pre"),
                tokens=tokens, scores=scores, types=types,
                merges=[_as_text(m, "tokenizer.ggml.merges") for m in merges],
                token_to_id=token_to_id)
        v._load_special(md, default_add_bos, default_ids)
        v.rstrip_ids = v._rstrip_ids(md.get("general.name", ""))
        return v

    def _rstrip_ids(self, model_name) -> frozenset:
        """llama.cpp's RSTRIP attribute, which it sets by model name: in a model named
        Phi-3 every special token (and </s>) but <unk>, <s> and <|endoftext|> removes the
        whitespace that follows it in raw text, as Phi-3's tokenizer.json declares."""
        name = model_name.lower() if isinstance(model_name, str) else ""
        if "phi-3" not in name and "phi3" not in name:
            return frozenset()
        special = {TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN}
        ids = {i for i, t in enumerate(self.types) if t in special}
        ids |= {self.token_to_id[t] for t in ("</s>",) if t in self.token_to_id}
        ids -= {self.token_to_id[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in self.token_to_id}
        return frozenset(ids)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def _load_special(self, md, default_add_bos, default_ids):
        n = self.n_vocab
        ids = {}
        for name, default in default_ids.items():
            ids[name] = default if default is not None and default < n else None
        for name, key in SPECIAL_ID_KEYS:
            value = _key(md, key)
            # An id outside the vocabulary is ignored, as llama.cpp does (with a warning there).
            if value is not None and 0 <= int(value) < n:
                ids[name] = int(value)
        for name, texts in (("eot", EOT_TEXTS), ("eom", EOM_TEXTS), ("fim_pre", FIM_PRE_TEXTS),
                            ("fim_suf", FIM_SUF_TEXTS), ("fim_mid", FIM_MID_TEXTS),
                            ("fim_pad", FIM_PAD_TEXTS), ("fim_rep", FIM_REP_TEXTS),
                            ("fim_sep", FIM_SEP_TEXTS)):
            if ids.get(name) is None:
                ids[name] = self._first_of(texts)
                if ids[name] is not None:
                    # A known control text typed as normal is a conversion bug; llama.cpp
                    # overrides the type so that it is never produced from user text.
                    self._make_control(ids[name])

        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids.get(k) is not None}
        for i, text in enumerate(self.tokens):
            if text in EOG_TEXTS:
                eog.add(i)
                self._make_control(i)
        for text in ALWAYS_RENDERED_TEXTS:
            if text in self.token_to_id:
                self.types[self.token_to_id[text]] = TOKEN_TYPE_USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids.get(k) is not None}
        # gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
        texts = {self.tokens[i] for i in eog}
        has_call = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
            end = self.token_to_id["<|end|>"]
            eog.discard(end)
            self.types[end] = TOKEN_TYPE_USER_DEFINED
        # gemma4 / paddleocr: "</s>" is an ordinary token next to "<|tool_response>".
        if "<|tool_response>" in texts and "</s>" in texts:
            s = self.token_to_id["</s>"]
            eog.discard(s)
            self.types[s] = TOKEN_TYPE_NORMAL

        self.bos_id, self.eos_id, self.unk_id = ids.get("bos"), ids.get("eos"), ids.get("unk")
        self.eot_id, self.eom_id = ids.get("eot"), ids.get("eom")
        self.eog_ids = frozenset(eog)
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", default_add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        if self.add_bos and self.bos_id is None:
            raise ModelError("tokenizer.ggml.add_bos_token is true, but tokenizer.ggml.bos_token_id is not set")
        if self.add_eos and self.eos_id is None:
            raise ModelError("tokenizer.ggml.add_eos_token is true, but tokenizer.ggml.eos_token_id is not set")

    def _first_of(self, texts):
        found = [self.token_to_id[t] for t in texts if t in self.token_to_id]
        return min(found) if found else None

    def _make_control(self, i):
        # llama.cpp adds the CONTROL attribute; a control bit overrides every other type's
        # behaviour (never split from user text, rendered only on request), so replacing
        # the type is the same thing.
        self.types[i] = TOKEN_TYPE_CONTROL

    def special_tokens(self, parse_special: bool) -> list[tuple[str, int]]:
        """Tokens split out of raw text before tokenizing, longest text first (llama.cpp's
        cache_special_tokens). User-defined tokens are always split out; control and unknown
        tokens only when the caller asks for special-token parsing (chat templates)."""
        kinds = {TOKEN_TYPE_USER_DEFINED}
        if parse_special:
            kinds |= {TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN}
        found = [(t, i) for i, t in enumerate(self.tokens) if self.types[i] in kinds]
        # A token's text holds its bytes, surrogate-escaped where they are not UTF-8.
        found.sort(key=lambda ti: -len(ti[0].encode("utf-8", "surrogateescape")))
        return found
