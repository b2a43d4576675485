"""Chat templates: turn a list of messages into the prompt text a chat model was trained on.

A GGUF carries its template as Jinja source in `tokenizer.chat_template` (copied from the
Hugging Face `tokenizer_config.json`). We render it the way `transformers` does
(`apply_chat_template`): Jinja2 with trim_blocks/lstrip_blocks and the variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, plus the helpers
`raise_exception` and `strftime_now`.

A template is code shipped inside a downloaded file, so it runs in Jinja's
ImmutableSandboxedEnvironment, where attribute access to Python internals (`__class__`,
`__globals__`, ...) and mutation of lists/dicts are refused. llama-cpp-python rendered
templates in a plain Environment and a model file could execute arbitrary code
(CVE-2024-34359); here any such attempt raises ChatTemplateError and executes nothing.
The sandbox also bounds what a render may cost, since a hostile template could otherwise
hang the process or exhaust its memory with a few characters (`'a' * 10**10`, nested
loops over big ranges, a string doubled in a loop): every string or list the template
builds, and the rendered text, is at most MAX_RENDERED long, and one render iterates at
most RANGE_BUDGET range() items in all. Real templates stay far below both.

Files without a template get a built-in one, chosen like llama.cpp chooses: by looking
for a family's marker tokens (here in the vocabulary, since there is no template text),
and ChatML otherwise, which is llama.cpp's default.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import KilnError


class ChatTemplateError(KilnError):
    """A chat template is malformed, unsafe, or refused the messages it was given."""


# The longest string or list a template may build, and the longest prompt it may render
# (16 Mi characters: some 4 M tokens, far beyond any context window).
MAX_RENDERED = 1 << 24
# range() items one render may iterate, nested loops included (a template loops over the
# messages, and over ranges of a few items at most).
RANGE_BUDGET = 1_000_000


# Built-in templates, written in the same Jinja dialect as the ones models ship.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama-2-chat format: the system prompt sits inside the first [INST] block.
LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 and system_message %}"
    "{{ bos_token + '[INST] <<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma's turns, as llama.cpp's built-in "gemma" writes them: no system role (a leading
# system message opens the first user turn, followed by a blank line), the assistant
# named "model", contents trimmed; the tokenizer adds BOS.
GEMMA = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if loop.first and system and role != 'model' %}{{ system + '\n\n' }}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3, "gemma": GEMMA}

# Tokens that end an assistant turn, by the marker text a template uses. The first one
# found in the template source (and the vocabulary) becomes a stop token for chat.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def detect_template(text: str) -> str | None:
    """Name of the built-in family `text` (a template source or vocabulary dump) belongs to.

    The same marker tests as llama.cpp's llm_chat_detect_template, for the families kiln
    ships; None when none matches.
    """
    if "<|im_start|>" in text:
        return "chatml"
    if "<start_of_turn>" in text:
        return "gemma"
    if "<|start_header_id|>" in text and "<|end_header_id|>" in text:
        return "llama3"
    if "[INST]" in text:
        return "llama2"
    return None


def _raise_exception(message):
    # Templates call this to reject a conversation (e.g. roles that do not alternate).
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    # transformers' tojson: keeps non-ASCII text as is (Jinja's own escapes HTML).
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _too_big(what: str, n: int):
    return SecurityError(f"{what} of {n} is over the sandbox's limit of {MAX_RENDERED} "
                         f"characters or items")


def _size(x) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


# the widths and precisions of str.format fields and printf-style conversions
_FORMAT_NUMBERS = re.compile(r"\{[^{}]*?:[^{}\d]*(\d+)(?:\.(\d+))?|%(?:\([^)]*\))?[-+ #0]*(\d+)?(?:\.(\d+))?")


def _check_format(fmt):
    """SecurityError if a format string asks for a field wider than MAX_RENDERED."""
    if isinstance(fmt, str):
        for m in _FORMAT_NUMBERS.finditer(fmt):
            n = max((int(g) for g in m.groups() if g), default=0)
            if n > MAX_RENDERED:
                raise _too_big("a formatted field", n)


def _check_width_args(args, what: str):
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and a > MAX_RENDERED:
            raise _too_big(what, a)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with `a ~ b` (string concatenation, which the sandbox has
    no hook for) going through the environment's size check."""

    def visit_Concat(self, node, frame):
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises at once instead of turning
    into an Undefined that prints as an empty string, and the operators that can build
    huge values check the size of their result before building it."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) is not None and isinstance(n, int) and len(seq) * n > MAX_RENDERED:
                    raise _too_big("a repetition", len(seq) * n)
        elif operator == "+":
            a, b = _size(left), _size(right)
            if a is not None and b is not None and a + b > MAX_RENDERED:
                raise _too_big("a concatenation", a + b)
        elif operator == "%":
            _check_format(left)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * max(1, abs(left).bit_length()) > 4096:
                raise SecurityError(f"{left} ** {right} is over the sandbox's limit of 4096 bits")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None

        def checked(*args, **kwargs):
            _check_format(value.__self__)
            _check_width_args((*args, *kwargs.values()), "a str.format() argument")
            return wrapped(*args, **kwargs)
        return checked

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (the sandbox's own names)
        # str methods that pad or repeat to a width given as an argument (center, ljust, zfill, ...)
        if isinstance(getattr(__obj, "__self__", None), str):
            _check_width_args((*args, *kwargs.values()), f"str.{getattr(__obj, '__name__', '?')}()")
        return super().call(__context, __obj, *args, **kwargs)

    @staticmethod
    def checked_concat(parts):
        parts = [p if isinstance(p, str) else str(p) for p in parts]
        n = sum(map(len, parts))
        if n > MAX_RENDERED:
            raise _too_big("a concatenation", n)
        return "".join(parts)


def _budgeted_range():
    """range() for one render: each call's items count against RANGE_BUDGET."""
    left = RANGE_BUDGET

    def bounded_range(*args):
        nonlocal left
        r = range(*args)
        if len(r) > left:
            raise SecurityError(f"range() asked for {len(r)} items with {left} of the render's "
                                f"budget of {RANGE_BUDGET} left")
        left -= len(r)
        return r
    return bounded_range


def _make_env() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                   autoescape=False, keep_trailing_newline=False)
    env.filters["tojson"] = _tojson
    format_filter, center_filter = env.filters["format"], env.filters["center"]

    def checked_format(value, *args, **kwargs):
        _check_format(value)
        return format_filter(value, *args, **kwargs)

    def checked_center(value, width=80):
        _check_width_args((width,), "the center filter's width")
        return center_filter(value, width)
    env.filters["format"], env.filters["center"] = checked_format, checked_center
    # range is given per render (_budgeted_range); this one only stands in at compile time
    env.globals = {"range": _budgeted_range(), "dict": dict, "namespace": env.globals["namespace"],
                   "raise_exception": _raise_exception, "strftime_now": _strftime_now}
    return env


def _check_messages(messages) -> list[dict]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ChatTemplateError(f"message {i}: 'role' and 'content' must be strings")
        out.append(dict(m))
    return out


class ChatTemplate:
    """A compiled chat template and the end-of-turn markers generation stops on."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 name: str | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("chat template is empty")
        self.source = source
        self.name = name or detect_template(source) or "custom"
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _make_env().from_string(source)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from None
        # Strings that close an assistant turn: the family's marker if the template uses
        # it, and the EOS text the template appends (Llama-2 style).
        self.end_of_turn = [m for m in END_OF_TURN_MARKERS if m in source]
        if eos_token and ("eos_token" in source or eos_token in source) \
                and eos_token not in self.end_of_turn:
            self.end_of_turn.append(eos_token)

    def render(self, messages: Iterable[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; raises ChatTemplateError, never runs Python code."""
        messages = _check_messages(list(messages) if not isinstance(messages, Sequence) else messages)
        try:
            pieces, n = [], 0
            for piece in self._template.generate(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token, eos_token=self.eos_token, range=_budgeted_range()):
                n += len(piece)
                if n > MAX_RENDERED:
                    raise _too_big("the rendered prompt", n)
                pieces.append(piece)
            return "".join(pieces)
        except (RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__} (it recursed "
                                    f"or built values too large)") from None
        except SecurityError as e:
            raise ChatTemplateError(f"chat template tried an unsafe operation and was stopped: {e}") \
                from None
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def render_with_spans(self, messages, add_generation_prompt: bool = True):
        """(text, spans): render()'s text and the (start, end) ranges in it that are the
        messages' contents, which the tokenizer keeps as plain text (a user writing
        '<|im_end|>' must not end their turn). Found by rendering once more with a
        marker for each content: where the template transforms contents beyond
        stripping them, spans is None."""
        text = self.render(messages, add_generation_prompt)
        messages = list(messages)
        contents = [m.get("content") if isinstance(m, Mapping) else None for m in messages]
        marked = [dict(m, content=f"\ue000{k}\ue001") if isinstance(c, str) and c else m
                  for k, (m, c) in enumerate(zip(messages, contents))]
        try:
            text_marked = self.render(marked, add_generation_prompt)
        except ChatTemplateError:
            return text, None
        for form in (str, str.strip):
            out, spans, at, length = [], [], 0, 0
            for m in re.finditer("\ue000(\\d+)\ue001", text_marked):
                k = int(m.group(1))
                if k >= len(contents) or not isinstance(contents[k], str):
                    break
                piece, content = text_marked[at:m.start()], form(contents[k])
                spans.append((length + len(piece), length + len(piece) + len(content)))
                out += [piece, content]
                length += len(piece) + len(content)
                at = m.end()
            else:
                out.append(text_marked[at:])
                if "".join(out) == text:
                    return text, spans
        return text, None

    @classmethod
    def builtin(cls, name: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        if name not in BUILTIN_TEMPLATES:
            raise ChatTemplateError(f"unknown built-in chat template {name!r} "
                                    f"(choose from {', '.join(BUILTIN_TEMPLATES)})")
        return cls(BUILTIN_TEMPLATES[name], bos_token, eos_token, name=name)

    @classmethod
    def from_file(cls, path, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """`--chat-template`: a Jinja file, or the name of a built-in (chatml, llama2, llama3,
        gemma)."""
        path = str(path)
        if path in BUILTIN_TEMPLATES and not Path(path).exists():
            return cls.builtin(path, bos_token, eos_token)
        try:
            source = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ChatTemplateError(f"chat template file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read chat template {path}: {e}") from None
        return cls(source, bos_token, eos_token)

    @classmethod
    def for_model(cls, metadata: Mapping, tokenizer, override=None) -> "ChatTemplate":
        """The template a model chats with: `override` (file or built-in name), else the
        file's `tokenizer.chat_template`, else a built-in chosen from the vocabulary."""
        bos = _special_text(tokenizer, getattr(tokenizer, "bos_id", None))
        eos = _special_text(tokenizer, getattr(tokenizer, "eos_id", None))
        if override is not None:
            return cls.from_file(override, bos, eos)
        source = metadata.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, bos, eos)
        return cls.builtin(_family_from_vocab(metadata, tokenizer), bos, eos)


def _special_text(tokenizer, token_id) -> str:
    if token_id is None or token_id < 0:
        return ""
    return tokenizer.token_text(token_id)


def _family_from_vocab(metadata: Mapping, tokenizer) -> str:
    """With no template text, look for a family's marker tokens in the vocabulary."""
    markers = ("<|im_start|>", "<|start_header_id|>", "<|end_header_id|>", "[INST]",
               "<start_of_turn>")
    present = []
    n_vocab = getattr(tokenizer, "n_vocab", 0)
    wanted = set(markers)
    # Control tokens sit at the start or the end of a vocabulary; scanning all of it is
    # cheap enough (one pass over ~50-150k short strings) and catches either layout.
    for i in range(n_vocab):
        text = tokenizer.token_text(i)
        if text in wanted:
            present.append(text)
    family = detect_template(" ".join(present))
    if family is None and metadata.get("tokenizer.ggml.model") == "llama":
        # A SentencePiece Llama vocabulary without chat markers: Llama-2-chat.
        family = "llama2"
    return family or "chatml"
