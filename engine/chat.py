"""Chat on top of LLM.generate: template rendering, end-of-turn stopping, and ChatSession,
which keeps a conversation and its KV cache across turns.

`LLM.chat(messages, stream, **sampling)` is `chat_completion(llm, messages, ...)`.

How a follow-up turn avoids re-reading the conversation: the KV cache holds the tokens
of the previous prompt and of the reply the model generated. The new prompt is the same
text with the reply, its end-of-turn marker and the new user message appended, so the
session builds its token list as (previous prompt tokens + reply tokens + tokens of the
appended text). LLM.generate reuses the longest cached prefix, so only the appended
tokens are evaluated. (Re-tokenizing the whole rendered text would usually give the same
ids, but the tokens the model sampled need not be the canonical tokenization of their
text; keeping them avoids re-evaluating a reply for that reason.)
"""
from __future__ import annotations

import json
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.errors import ContextOverflowError, KilnError
from engine.completion import Timings, stop_list
from engine.sampler import sampling_defaults
from formats.atomic import atomic_write

ROLES = ("system", "user", "assistant")

_templates: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def template_for(llm, override=None) -> ChatTemplate:
    """The chat template of `llm`'s model (cached per LLM), or `override` (a ChatTemplate,
    a template file, or a built-in name)."""
    if isinstance(override, ChatTemplate):
        return override
    if override is not None:
        return ChatTemplate.for_model(llm.metadata, llm.tokenizer, override=override)
    t = _templates.get(llm)
    if t is None:
        t = _templates[llm] = ChatTemplate.for_model(llm.metadata, llm.tokenizer)
    return t


def end_of_turn_stops(llm, template: ChatTemplate) -> list[str]:
    """Stop strings for the template's end-of-turn markers that the tokenizer does not
    already treat as end-of-generation tokens (those stop generation by themselves)."""
    tok = llm.tokenizer
    eog = set(tok.eog_ids)
    stops = []
    for marker in template.end_of_turn:
        ids = tok.encode(marker, add_bos=False, special=True)
        if not (len(ids) == 1 and ids[0] in eog):
            stops.append(marker)
    return stops


def tokenize_prompt(llm, template: ChatTemplate, text: str, spans=None) -> list[int]:
    """Rendered chat text -> ids, parsing special-token text (the template writes
    `<|im_start|>` etc. as text) except inside `spans`, the messages' contents (from
    ChatTemplate.render_with_spans), where such text stays text. The file's BOS is added
    unless the template already wrote it, so a BOS never appears twice."""
    add_bos = None
    if template.bos_token and text.startswith(template.bos_token):
        add_bos = False
    return llm.tokenize(text, add_bos=add_bos, special=True, plain_spans=spans or ())


def render_prompt(template: ChatTemplate, messages, special: bool = False):
    """(text, spans) of the generation prompt for messages. special=True parses special-
    token text in the messages too (llama.cpp's server does); by default it is plain text,
    and where the template's rewriting of contents hides them, that is said once."""
    if special:
        return template.render(messages, add_generation_prompt=True), None
    text, spans = template.render_with_spans(messages, add_generation_prompt=True)
    if spans is None and not getattr(template, "_warned_spans", False):
        template._warned_spans = True
        warnings.warn("this chat template rewrites message contents, so kiln cannot keep "
                      "special-token text in them as plain text", stacklevel=3)
    return text, spans


def _merge_stops(stop, extra):
    stop = stop_list(stop)
    return stop + [s for s in extra if s not in stop]


def chat_completion(llm, messages, stream: bool = False, chat_template=None, special: bool = False,
                    **sampling):
    """Reply to `messages` (a list of {"role", "content"} dicts) as the assistant.

    The messages are rendered with the model's chat template (or `chat_template`: a
    ChatTemplate, template file or built-in name) and generation stops at the template's
    end of turn. Text in the messages that spells a special token (`<|im_end|>`) is
    plain text unless special=True. Returns what `llm.generate` returns: a Completion, or
    with stream=True an iterator of str pieces (the Completion is then in
    `llm.last_completion`).
    """
    template = template_for(llm, chat_template)
    text, spans = render_prompt(template, messages, special)
    sampling["stop"] = _merge_stops(sampling.get("stop"), end_of_turn_stops(llm, template))
    return llm.generate(tokenize_prompt(llm, template, text, spans), stream=stream, **sampling)


@dataclass
class TurnStats:
    """What the last reply cost, for the REPL's stats line. `timings.prompt_tokens` is the
    whole prompt; `timings.prompt_tokens_evaluated` the part not found in the KV cache."""
    timings: Timings
    finish_reason: str              # "stop" | "length" | "interrupted"
    dropped_messages: int = 0       # old messages dropped to fit the context

    @classmethod
    def from_completion(cls, completion, dropped_messages: int = 0) -> "TurnStats":
        return cls(completion.timings, completion.finish_reason, dropped_messages)


SAMPLING_DEFAULTS = dict(sampling_defaults(), seed=None, max_tokens=None)


class ChatSession:
    """A conversation with one model: its messages, sampling settings, and the token
    state that lets each turn reuse the KV cache.

        s = ChatSession(llm, system="Be brief.", temperature=0)
        reply = s.send("Hi")                       # str
        for piece in s.send("And?", stream=True):  # str pieces
            print(piece, end="")
    """

    def __init__(self, llm, system: str | None = None, chat_template=None, **settings):
        self.llm = llm
        self.template = template_for(llm, chat_template)
        self.settings = dict(SAMPLING_DEFAULTS)
        self.update_settings(**settings)
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.last_stats: TurnStats | None = None
        self._stops = end_of_turn_stops(llm, self.template)
        self._spans = None  # the message contents' spans in the last rendered prompt
        self._forget_tokens()

    # --- settings and history ----------------------------------------------------------
    def update_settings(self, **settings):
        """Change sampling settings (temperature, top_k, top_p, min_p, repeat_penalty,
        seed, max_tokens); values are checked when the next reply is generated."""
        unknown = set(settings) - set(SAMPLING_DEFAULTS)
        if unknown:
            raise KilnError(f"unknown chat setting(s): {', '.join(sorted(unknown))}")
        self.settings.update(settings)

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text: str | None):
        """Replace (or with None/"" remove) the system prompt, keeping the conversation."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})
        self._forget_tokens()

    def clear(self):
        """Forget the conversation, keeping the system prompt."""
        self.messages = self.messages[:1] if self.system is not None else []
        self._forget_tokens()

    def save(self, path):
        """Write the conversation (and settings) as JSON."""
        data = {"messages": self.messages, "settings": self.settings}
        try:
            with atomic_write(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise KilnError(f"cannot save the conversation to {path}: {e.strerror}") from None

    def load(self, path):
        """Replace the conversation with one saved by save() (or a bare list of messages)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KilnError(f"no such conversation file: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KilnError(f"cannot load a conversation from {path}: {e}") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        self.messages = _check_history(messages, path)
        if isinstance(data, dict) and isinstance(data.get("settings"), dict):
            self.update_settings(**{k: v for k, v in data["settings"].items() if k in SAMPLING_DEFAULTS})
        self._forget_tokens()

    # --- the token state ---------------------------------------------------------------
    def _forget_tokens(self):
        # The previous turn's generation prompt (text and ids) and reply, if the history
        # still ends with that exchange; None means "render and tokenize from scratch".
        self._prev_prompt_text: str | None = None
        self._prev_prompt_ids: list[int] = []
        self._prev_reply_text = ""
        self._prev_reply_ids: list[int] = []

    def _prompt_ids(self, text: str) -> list[int]:
        """Ids of the rendered prompt `text` (the last _render's), reusing the previous
        turn's ids."""
        prev = self._prev_prompt_text
        spans = self._spans or ()
        if prev is not None and text.startswith(prev):
            ids = list(self._prev_prompt_ids)
            off = len(prev)
            if self._prev_reply_ids and text[off:].startswith(self._prev_reply_text):
                ids += self._prev_reply_ids
                off += len(self._prev_reply_text)
            rest = [(a - off, b - off) for a, b in spans if b > off]
            return ids + self.llm.tokenize(text[off:], add_bos=False, special=True,
                                           plain_spans=rest)
        return tokenize_prompt(self.llm, self.template, text, spans)

    def _render(self, messages) -> str:
        text, self._spans = render_prompt(self.template, messages)
        return text

    def _fit(self, messages) -> tuple[list[dict], str, list[int], int]:
        """Drop the oldest messages after the system prompt until the prompt leaves room
        for a reply; returns (messages, text, ids, number dropped)."""
        n_ctx = self.llm.n_ctx
        max_tokens = self.settings.get("max_tokens")
        # Room to keep for the reply: what was asked for, else a quarter of the context.
        reserve = min(max_tokens, n_ctx // 2) if max_tokens else n_ctx // 4
        dropped = 0
        while True:
            text = self._render(messages)
            ids = (self._prompt_ids(text) if dropped == 0
                   else tokenize_prompt(self.llm, self.template, text, self._spans))
            if len(ids) + reserve <= n_ctx:
                return messages, text, ids, dropped
            first = 1 if messages and messages[0]["role"] == "system" else 0
            # Keep the new user message; drop whole exchanges (user + its reply) first.
            if len(messages) - first <= 1:
                if len(ids) < n_ctx:
                    return messages, text, ids, dropped   # fits, with less room to reply
                raise ContextOverflowError(
                    f"the message is too long: the prompt is {len(ids)} tokens and the context "
                    f"holds {n_ctx} (start kiln with a larger --ctx or send a shorter message)")
            n = 2 if len(messages) - first > 2 and messages[first]["role"] == "user" else 1
            messages = messages[:first] + messages[first + n:]
            dropped += n

    # --- a turn ------------------------------------------------------------------------
    def send(self, content: str, stream: bool = False):
        """Add a user message and generate the assistant's reply.

        Returns the reply text, or with stream=True an iterator of str pieces. The
        exchange joins the history when the reply ends; closing the stream early (the
        REPL's Ctrl-C) keeps the partial reply. If generation fails, the user message is
        taken back out of the history.
        """
        if not isinstance(content, str):
            raise TypeError("a chat message must be a str")
        messages, text, ids, dropped = self._fit(self.messages + [{"role": "user", "content": content}])
        pieces = self._generate(messages, text, ids, dropped)
        if stream:
            return pieces
        return "".join(pieces)

    def _generate(self, messages, text, ids, dropped):
        settings = dict(self.settings)
        max_tokens = settings.pop("max_tokens")
        llm = self.llm
        stream = llm.generate(ids, stream=True, stop=self._stops, max_tokens=max_tokens, **settings)
        parts: list[str] = []
        done = False
        clock = [time.perf_counter(), None, llm.n_tokens_evaluated]   # start, first piece, count
        try:
            for piece in stream:
                if clock[1] is None:
                    clock[1] = time.perf_counter()
                parts.append(piece)
                yield piece
            done = True
        finally:
            # Runs on normal end, on close() (Ctrl-C in the REPL) and on errors raised
            # inside generate (then nothing was generated: history stays as it was).
            if hasattr(stream, "close"):
                stream.close()
            if done or parts:
                self._commit(messages, text, ids, dropped, "".join(parts), done, clock)

    def _commit(self, messages, text, ids, dropped, reply, done, clock):
        completion = getattr(self.llm, "last_completion", None) if done else None
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self._prev_prompt_text, self._prev_prompt_ids = text, list(ids)
        self._prev_reply_text = reply
        if completion is not None and completion.text == reply \
                and self.llm.detokenize(completion.tokens) == reply:
            self._prev_reply_ids = list(completion.tokens)
        else:
            # Interrupted or cut by a stop string: the sampled ids are not exactly the
            # text; tokenize the text (the cache still covers the matching prefix).
            self._prev_reply_ids = self.llm.tokenize(reply, add_bos=False, special=False) if reply else []
        if completion is not None:
            self.last_stats = TurnStats.from_completion(completion, dropped)
        else:
            # Stopped early: no Completion; estimate from the clock and the cache, which
            # holds the prompt and every reply token evaluated so far.
            start, first, n_before = clock
            first = first or start
            n_reply = max(0, len(self.llm.cached_tokens) - len(ids))
            n_prompt = max(0, self.llm.n_tokens_evaluated - n_before - n_reply)
            timings = Timings(len(ids), n_prompt, first - start, n_reply, time.perf_counter() - first)
            self.last_stats = TurnStats(timings, "interrupted", dropped)

    @property
    def n_context_tokens(self) -> int:
        """Tokens the conversation occupies in the context after the last reply."""
        return len(self._prev_prompt_ids) + len(self._prev_reply_ids)


def _check_history(messages, path) -> list[dict]:
    if not isinstance(messages, list):
        raise KilnError(f"{path} does not hold a conversation (expected a list of messages)")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise KilnError(f"{path}: message {i} is not a {{'role': system|user|assistant, "
                            f"'content': str}} object")
        if m["role"] == "system" and i != 0:
            raise KilnError(f"{path}: message {i}: only the first message may be the system prompt")
        out.append({"role": m["role"], "content": m["content"]})
    return out


__all__ = ["ChatSession", "ChatTemplateError", "TurnStats", "chat_completion", "template_for"]
