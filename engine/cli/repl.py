"""`kiln chat`: the terminal chat program (a ChatSession behind a prompt).

At a terminal: line editing and history (readline), replies streamed as they are
generated, Ctrl-C stops a reply (a second Ctrl-C at an empty prompt, Ctrl-D, /bye or
/exit leave), multi-line input between \"\"\" lines, slash commands, and a dim stats line
after each reply. With stdin not a terminal (a pipe, a file): one message per input line,
one reply per message on stdout, no prompts or colours; exits at end of input.
"""
from __future__ import annotations

import os
import signal
import sys

from engine.chat import ChatSession
from engine.errors import KilnError
from formats.atomic import atomic_path

PROMPT = ">>> "
CONTINUATION = "... "
MULTILINE = '"""'

HELP = """\
Commands:
  /help                  this list
  /clear                 forget the conversation (keeps the system prompt)
  /system [TEXT]         set the system prompt (no TEXT: show it; /system - removes it)
  /set                   show the sampling settings
  /set NAME VALUE        temp | top_k | top_p | min_p | repeat_penalty | seed | max_tokens
                         (seed none = random, max_tokens none = until the end of the turn)
  /stats                 context use and the speed of the last reply
  /save FILE             save the conversation as JSON
  /load FILE             load a conversation saved with /save
  /bye, /exit            leave (also Ctrl-D, or Ctrl-C twice at an empty prompt)
Ctrl-C stops a reply. Start a message with \"\"\" to write several lines; end it with \"\"\"."""

# /set names -> (setting key, parser)
def _opt_int(v):
    return None if v.lower() in ("none", "off", "-1") else int(v)


SETTINGS = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "seed": ("seed", _opt_int), "max_tokens": ("max_tokens", _opt_int),
}


def stats_line(stats) -> str:
    """`[prompt: N tok, X tok/s | reply: M tok, Y tok/s]` for a TurnStats (N counts the
    prompt tokens the model ran; the rest came from the KV cache)."""
    t = stats.timings
    return (f"[prompt: {t.prompt_tokens_evaluated} tok, {t.prompt_tokens_per_second:.1f} tok/s | "
            f"reply: {t.generated_tokens} tok, {t.tokens_per_second:.1f} tok/s]")


class _Interrupt:
    """Turns SIGINT into a flag while a reply streams, so Ctrl-C stops the reply between
    two tokens instead of raising inside the model or the session bookkeeping."""

    def __init__(self):
        self.hit = False
        self._old = None

    def _handler(self, signum, frame):
        self.hit = True

    def __enter__(self):
        self.hit = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:      # not the main thread: Ctrl-C cannot be caught here
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Repl:
    def __init__(self, session: ChatSession, stdin=None, stdout=None, stderr=None,
                 interactive: bool | None = None):
        self.session = session
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        if interactive is None:
            interactive = _isatty(self.stdin)
        self.interactive = interactive
        self.color = interactive and _isatty(self.stdout) and "NO_COLOR" not in os.environ
        self.running = True
        self._readline = None

    # --- output ------------------------------------------------------------------------
    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def note(self, text: str):
        """A message from the program (not a reply): dim on stdout at a terminal, on
        stderr otherwise so that piped output holds only the replies."""
        if self.interactive:
            self.stdout.write(self._dim(text) + "\n")
            self.stdout.flush()
        else:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    # --- input -------------------------------------------------------------------------
    def _setup_readline(self):
        try:
            import readline
        except ImportError:         # e.g. Windows without pyreadline: plain input()
            return
        self._readline = readline
        from engine.cli.pull import cache_dir
        self._history = cache_dir() / "chat_history"
        try:
            readline.read_history_file(self._history)
        except OSError:
            pass
        readline.set_history_length(1000)

    def _save_history(self):
        if self._readline is None:
            return
        try:
            self._history.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._history) as tmp:
                self._readline.write_history_file(tmp)
        except OSError:
            pass

    def _read_message(self) -> str | None:
        """One message from the terminal (None = leave). Handles \"\"\" blocks and Ctrl-C."""
        interrupts = 0
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                self.stdout.write("\n")
                return None
            except KeyboardInterrupt:
                # Ctrl-C on a line with text clears it; twice on an empty one leaves.
                typed = self._readline.get_line_buffer() if self._readline else ""
                self.stdout.write("\n")
                if typed:
                    interrupts = 0
                    continue
                interrupts += 1
                if interrupts >= 2:
                    return None
                self.note("(Ctrl-C again, Ctrl-D or /bye to leave)")
                continue
            if line.lstrip().startswith(MULTILINE):
                return self._read_block(line.lstrip()[len(MULTILINE):])
            return line

    def _read_block(self, first: str) -> str | None:
        if first.rstrip().endswith(MULTILINE):           # """one line"""
            return first.rstrip()[:-len(MULTILINE)]
        lines = [first] if first else []
        while True:
            try:
                line = input(CONTINUATION)
            except EOFError:
                self.stdout.write("\n")
                return "\n".join(lines)
            except KeyboardInterrupt:
                self.stdout.write("\n")
                return ""                                 # abandon the block
            if line.rstrip().endswith(MULTILINE):
                last = line.rstrip()[:-len(MULTILINE)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(line)

    # --- commands ----------------------------------------------------------------------
    def command(self, line: str):
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        s = self.session
        if name in ("/bye", "/exit", "/quit"):
            self.running = False
        elif name in ("/help", "/?"):
            self.note(HELP)
        elif name == "/clear":
            s.clear()
            self.note("conversation cleared" + (" (system prompt kept)" if s.system else ""))
        elif name == "/system":
            if not arg:
                self.note(f"system prompt: {s.system!r}" if s.system else "no system prompt")
            else:
                s.set_system(None if arg == "-" else arg)
                self.note("system prompt removed" if arg == "-" else "system prompt set")
        elif name == "/set":
            self._set(arg)
        elif name == "/stats":
            self._stats()
        elif name == "/save":
            if not arg:
                raise KilnError("usage: /save FILE")
            s.save(arg)
            self.note(f"saved {len(s.messages)} messages to {arg}")
        elif name == "/load":
            if not arg:
                raise KilnError("usage: /load FILE")
            s.load(arg)
            self.note(f"loaded {len(s.messages)} messages from {arg}")
        else:
            raise KilnError(f"unknown command {name}; /help lists the commands")

    def _set(self, arg: str):
        s = self.session
        if not arg:
            self.note("  ".join(f"{k}={v}" for k, v in s.settings.items()))
            return
        key, _, value = arg.partition(" ")
        if key not in SETTINGS or not value.strip():
            raise KilnError(f"usage: /set {'|'.join(k for k in SETTINGS if k != 'temperature')} VALUE")
        setting, parse = SETTINGS[key]
        try:
            parsed = parse(value.strip())
        except ValueError:
            raise KilnError(f"/set {key}: not a valid value: {value.strip()!r}") from None
        _validate(setting, parsed, s.settings)
        s.update_settings(**{setting: parsed})
        self.note(f"{setting} = {parsed}")

    def _stats(self):
        s = self.session
        llm = s.llm
        lines = [f"context: {s.n_context_tokens} / {llm.n_ctx} tokens, {len(s.messages)} messages",
                 f"tokens evaluated since start: {getattr(llm, 'n_tokens_evaluated', '?')}"]
        st = s.last_stats
        if st is not None:
            lines.append(f"last reply: {stats_line(st)} ({st.finish_reason}; prompt {st.timings.prompt_tokens} "
                         f"tokens, {st.timings.prompt_tokens - st.timings.prompt_tokens_evaluated} "
                         "from the cache)")
        self.note("\n".join(lines))

    # --- a turn ------------------------------------------------------------------------
    def reply(self, message: str):
        s = self.session
        out = self.stdout
        interrupted = False
        wrote_any = False
        # Ctrl-C from here on (prompt evaluation included) stops this reply only.
        with _Interrupt() as intr:
            stream = s.send(message, stream=True)
            try:
                for piece in stream:
                    out.write(piece)
                    out.flush()
                    wrote_any = True
                    if intr.hit:
                        break
            finally:
                stream.close()
            interrupted = intr.hit
        if wrote_any or not self.interactive:
            out.write("\n")
        out.flush()
        st = s.last_stats
        if st is not None and st.dropped_messages and self.interactive:
            self.note(f"[context full: dropped the {st.dropped_messages} oldest messages]")
        if interrupted:
            self.note("[stopped]")
        if st is not None and self.interactive and (wrote_any or not interrupted):
            self.note(stats_line(st))

    def handle(self, line: str):
        """One input: a slash command or a message. User errors print one line."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                self.command(line)
            else:
                self.reply(line[1:] if line.startswith("//") else line)
        except (KilnError, ValueError) as e:
            self.note(f"error: {e}")
            if not self.interactive:
                self.failed = True

    def run(self) -> int:
        self.failed = False
        if self.interactive:
            self._setup_readline()
            llm = self.session.llm
            name = os.path.basename(getattr(llm, "model_path", "") or "model")
            self.note(f"kiln chat: {name} (context {llm.n_ctx} tokens). /help for commands, "
                      "Ctrl-C stops a reply, Ctrl-D or /bye leaves.")
            try:
                while self.running:
                    message = self._read_message()
                    if message is None:
                        break
                    if message.strip():
                        try:
                            self.handle(message)
                        except KeyboardInterrupt:
                            # Ctrl-C in the instant between Enter and the reply starting
                            self.stdout.write("\n")
                            self.note("[stopped]")
            finally:
                self._save_history()
            return 0
        for raw in self.stdin:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            self.handle(line)
            if not self.running:
                break
        return 1 if self.failed else 0


def _validate(setting, value, current):
    """Check one sampling setting now, so /set reports a bad value at once."""
    from engine.sampler import SamplingParams, check_seed
    if setting == "seed":
        check_seed(value)
    elif setting == "max_tokens":
        if value is not None and value <= 0:
            raise KilnError("max_tokens must be a positive integer or none")
    else:
        params = {k: current[k] for k in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")}
        params[setting] = value
        SamplingParams(**params)


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def run_repl(session: ChatSession, **kwargs) -> int:
    return Repl(session, **kwargs).run()
