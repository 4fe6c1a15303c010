"""`m3mlx chat`: a conversation in the terminal, or messages piped through the model."""

import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click

from m3mlx.checks import InputError
from m3mlx.defaults import CHAT_MAX_TOKENS, RECOMMENDED_SAMPLING, home_dir
from m3mlx.distributed import DistributedError, Ranks
from m3mlx.experts import format_expert_stats
from m3mlx.kv_tier import KVCacheError
from m3mlx.shard_cache import part_path
from m3mlx.units import format_size

from .errors import Command, describe
from .options import PrefillMeter, decode_input, generation_options, load_or_fail, read_stdin

# /think arguments; the first three are what `--thinking` accepts.
THINK_MODES = {"enabled": "enabled", "disabled": "disabled", "adaptive": "adaptive",
               "on": "enabled", "off": "disabled"}

HELP = '''Commands:
  /think on|off|adaptive  thinking mode (on = enabled, off = disabled); alone, show it
  /system [TEXT]          set the system prompt; alone, show it; "/system default" resets it
  /reset                  forget the conversation
  /save PATH              save the conversation and its cache (PATH.safetensors; with
                          several ranks, each rank's part beside it: PATH.rankR-of-N...)
  /load PATH              continue a conversation saved with /save
  /stats                  context, speed and memory
  /help                   this text
  /quit                   leave (also /exit, or Ctrl-D)
Input: end a line with \\ to continue on the next one, or put """ alone on a line to start
and to end a multi-line message. Up/down arrows recall earlier input. Ctrl-C stops the
reply being written (at the prompt, it clears the line).'''

# Control characters (but tab and newline) would drive the terminal: show them as U+FFFD.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Style:
    color: bool

    def _wrap(self, code: str, end: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[{end}m" if self.color and text else text

    def dim(self, text: str) -> str:
        return self._wrap("2", "22", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", "22", text)

    def accent(self, text: str) -> str:
        return self._wrap("36", "39", text)


class Console:
    """Where replies and messages go: a terminal, or stdout/stderr when piped."""

    def __init__(self, interactive: bool, quiet: bool = False):
        self.interactive, self.quiet = interactive, quiet  # quiet: a rank other than 0
        self.style = Style(interactive and "NO_COLOR" not in os.environ)

    def write(self, text: str, err: bool = False):
        if self.quiet:
            return
        stream = sys.stderr if err else sys.stdout
        stream.write(text)
        stream.flush()

    def info(self, text: str):
        """Command feedback: on the terminal, or on stderr when stdout carries replies."""
        self.write(text + "\n", err=not self.interactive)

    def shown(self, text: str) -> str:
        return _CONTROL.sub("\ufffd", text) if self.interactive else text


def stream_reply(console: Console, stream):
    """Print a reply as it comes (reasoning dimmed); Ctrl-C stops it. Returns the ChatReply."""
    style = console.style
    aside = not console.interactive  # when piped, reasoning goes to stderr
    in_reasoning = False
    content_started = False
    try:
        for delta in stream:
            if delta.reasoning:
                console.write(style.dim(console.shown(delta.reasoning)), err=aside)
                in_reasoning = True
            # The answer's leading blank lines (usually after the reasoning) are not shown.
            content = delta.content if content_started else delta.content.lstrip("\n")
            if content:
                if in_reasoning:
                    console.write("\n", err=aside)
                    in_reasoning = False
                console.write(console.shown(content))
                content_started = True
            for call in delta.tool_calls:
                arguments = json.dumps(call.arguments, ensure_ascii=False)
                console.write(style.accent(f"\n[tool call] {call.name} {arguments}\n"))
    except KeyboardInterrupt:
        stream.close()
        console.write(style.dim(" [interrupted]"))
    console.write("\n")
    return stream.reply


def status_line(session, reply) -> str:
    limit = session.context_limit
    context = f"{session.context_used:,}/{limit:,}" if limit else f"{session.context_used:,}"
    experts = reply.expert_stats
    cache = "" if experts is None else (f" | experts {100 * experts.hit_rate:.0f}% hits, "
                                        f"{format_size(experts.bytes_per_token)}/token")
    return (f"[context {context} tokens | {reply.generation_tps:.1f} tok/s | "
            f"{reply.peak_memory:.2f} GB peak{cache}]")


def stats_text(session) -> str:
    limit = session.context_limit
    lines = [
        f"context: {session.context_used:,} of {limit:,} tokens" if limit
        else f"context: {session.context_used:,} tokens",
        f"cache: {session.cache_nbytes / 1e6:.1f} MB"
        + (f" ({session.cache_resident_nbytes / 1e6:.1f} MB in memory)"
           if session.cache_resident_nbytes < session.cache_nbytes else ""),
        f"messages: {len(session.messages)}, thinking: {session.thinking}",
    ]
    r = session.last_reply
    if r is not None:
        lines += [
            f"last prompt: {r.prompt_tokens:,} new tokens at {r.prompt_tps:.1f} tok/s, "
            f"{r.cached_tokens:,} reused from the cache",
            f"last reply: {r.generation_tokens:,} tokens at {r.generation_tps:.1f} tok/s "
            f"({r.finish_reason})",
            f"peak memory: {r.peak_memory:.2f} GB",
        ]
        if r.expert_stats is not None:
            lines.append(format_expert_stats(r.expert_stats).replace("Experts:", "experts:"))
    return "\n".join(lines)


class Quit(Exception):
    pass


def run_command(line: str, state: "ChatState"):
    """Carry out a slash command; raises Quit to leave."""
    console, session = state.console, state.session
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        raise Quit
    if name == "help":
        console.info(HELP)
    elif name == "think":
        if arg:
            if arg not in THINK_MODES:
                console.info("usage: /think on|off|adaptive")
                return
            session.thinking = THINK_MODES[arg]
        console.info(f"thinking: {session.thinking}")
    elif name == "system":
        if arg:
            session.system = None if arg == "default" else arg
        console.info(f"system prompt: {session.system or '(default)'}")
    elif name == "reset":
        session.reset()
        console.info("conversation cleared")
    elif name in ("save", "load"):
        if not arg:
            console.info(f"usage: /{name} PATH")
            return
        # Every rank saves or loads its own part, in step (m3mlx.shard_cache).
        with state.guard(f"could not {name} {arg}: "), state.ranks.armed(
                f"{'saving' if name == 'save' else 'loading'} {arg}"):
            path = user_path(arg)
            if name == "save":
                path = session.save(path)
                console.info(f"saved {len(session.messages)} messages to {path}"
                             + parts_note(path, state.ranks))
            else:
                state.session = type(session).load(path, session.model, session.tokenizer,
                                                   **session.cache_settings)
                console.info(f"loaded {len(state.session.messages)} messages "
                             f"({state.session.context_used:,} tokens) from {path}")
    elif name == "stats":
        console.info(stats_text(session))
    else:
        console.info(f"unknown command /{name}; /help lists them")


def parts_note(path: Path, ranks: Ranks) -> str:
    """Where the other ranks saved their parts of the cache, for the /save message."""
    if not ranks.sharded:
        return ""
    size = ranks.group.size()
    last = part_path(path, size - 1, size)
    others = last.name if size == 2 else f"{part_path(path, 1, size).name} ... {last.name}"
    return f" (rank 0's part; the other ranks' beside it on their machines: {others})"


def user_path(text: str) -> Path:
    """A path typed by the user, ~ and ~user expanded."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # ~nosuchuser
        raise InputError(f"{text.split('/')[0]} is not a user with a home directory") from None


@dataclass
class ChatState:
    console: Console
    session: object
    failed: bool = False  # a line failed: piped chat ends with exit status 1
    ranks: Ranks = field(default_factory=Ranks.alone)  # several under mlx.launch

    @contextmanager
    def guard(self, prefix: str = "error: "):
        """The chat's error boundary, one per line handled: any failure (Ctrl-C included)
        becomes one line of feedback and the conversation goes on, as it was."""
        try:
            yield
        except (Quit, SystemExit, GeneratorExit, DistributedError):
            raise
        except BaseException as e:
            if self.ranks.sharded and isinstance(e, KVCacheError):
                raise  # this rank's own disk failed it: the other ranks cannot go on alone
            message = describe(e)
            if message is None:
                raise
            if isinstance(e, KeyboardInterrupt):
                self.console.info(message)
            else:
                self.failed = True
                self.console.info(prefix + message)

    def reply_to(self, message: str):
        meter = PrefillMeter()
        try:
            with self.ranks.watching("replying"):
                stream = self.session.send(message, prefill_progress=self.ranks.progress(meter))
                reply = stream_reply(self.console, self.ranks.stepping(stream))
        finally:
            meter.close()
        if self.console.interactive and reply is not None:
            self.console.write(self.console.style.dim(status_line(self.session, reply)) + "\n")


def read_message(prompt: str = ">>> ", more: str = "... ") -> str:
    """One message from the terminal: a line, lines joined by a trailing backslash, or a
    block between two lines holding only triple quotes."""
    line = input(prompt)
    if line.strip() == '"""':
        lines = []
        while (line := input(more)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    return "\n".join(lines + [line])


def history_file() -> Path:
    return home_dir() / "chat_history"


def interactive(state: ChatState, banner: str):
    try:
        import readline
    except ImportError:  # line editing is a nicety; input() works without it
        readline = None
    history = history_file()
    if readline is not None:
        try:
            readline.read_history_file(history)
        except OSError:
            pass
    state.console.write(state.console.style.bold(banner) + "\n")
    try:
        while True:
            try:
                message = read_message()
            except KeyboardInterrupt:
                state.console.write("\n")
                continue
            except EOFError:
                state.console.write("\n")
                break
            except UnicodeDecodeError:
                state.console.info("that input is not UTF-8 text; type it again")
                continue
            handle(message, state)
    except Quit:
        pass
    finally:
        if readline is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
            except OSError:
                pass


def handle(message: str, state: ChatState):
    """A line starting with / is a command; any other non-blank text is a message. Whatever
    goes wrong is reported and the chat goes on."""
    with state.guard():
        if message.startswith("/"):
            run_command(message.strip(), state)
        elif message.strip():
            state.reply_to(message)


def piped(state: ChatState, input_mode: str):
    if input_mode == "whole" and state.ranks.sharded:
        raise click.UsageError("--input whole reads stdin to its end, which mlx.launch never "
                               "passes on: with several ranks, send lines and end with /quit")
    if input_mode == "whole":
        message = read_stdin("the message on stdin")
        if message.strip():
            state.reply_to(message)
        return
    try:
        for number, raw in enumerate(state.ranks.lines(sys.stdin.buffer), 1):
            try:
                line = decode_input(raw, f"line {number} of stdin")
            except InputError as e:
                state.console.info(f"{e}; skipped")
                continue
            handle(line.removesuffix("\n").removesuffix("\r"), state)
    except Quit:
        pass
    # Rank 0 reports a failed line (the others failed with it, or it was told): mlx.launch
    # ends the other ranks when one exits non-zero, which would cut rank 0's last output.
    if state.failed and state.ranks.leads:
        raise click.exceptions.Exit(1)


@click.command(cls=Command)
@generation_options(max_tokens=CHAT_MAX_TOKENS, sampling=RECOMMENDED_SAMPLING,
                    temp_help="Sampling temperature (M3's recommended 1.0); 0 is greedy.")
@click.option("--system", default=None, help="System prompt [default: the chat template's].")
@click.option("--thinking", type=click.Choice(["enabled", "disabled", "adaptive"]),
              default="adaptive", show_default=True,
              help="Thinking mode; switch it in the chat with /think on|off|adaptive.")
@click.option("--input", "input_mode", type=click.Choice(["lines", "whole"]), default="lines",
              show_default=True,
              help="When stdin is not a terminal: each line is a message (lines starting with / "
                   "are commands), or all of stdin is one message.")
def chat(model_path, system, thinking, max_tokens, temp, top_p, top_k, min_p,
         repetition_penalty, seed, prefill_step_size, index_bits, kv_bits, kv_memory,
         kv_cache_dir, dtype, parallel, rank_timeout, input_mode):
    """Chat with a model in the terminal: streaming replies, reasoning dimmed.

    In the chat, /help lists the commands (/think, /system, /reset, /save, /load, /stats,
    /quit). End a line with \\ to continue a message on the next line, or put \"\"\" alone on
    the lines before and after a multi-line message. Ctrl-C stops a reply; Ctrl-D leaves.

    When stdin is not a terminal, messages are read from it (see --input) and only the
    replies are written to stdout; reasoning and command output go to stderr.

    Started by mlx.launch on several ranks, the model is split between them (--parallel):
    rank 0 reads the messages and prints; end with /quit.
    """
    from m3mlx.chat import ChatSession

    # Started by mlx.launch, every rank runs the piped chat on rank 0's stdin.
    ranks = Ranks.start(rank_timeout)
    is_tty = not ranks.sharded and sys.stdin.isatty() and sys.stdout.isatty()
    console = Console(interactive=is_tty, quiet=not ranks.leads)
    if is_tty:
        console.write(console.style.dim(f"Loading {model_path} ...") + "\n")
    model, tokenizer = load_or_fail(model_path, dtype, parallel)
    session = ChatSession(
        model, tokenizer, system=system, thinking=thinking,
        index_bits=index_bits, kv_bits=kv_bits, kv_memory=kv_memory, kv_cache_dir=kv_cache_dir,
        max_tokens=max_tokens, temperature=temp,
        top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        seed=ranks.seed(seed),
        prefill_step_size=prefill_step_size,
    )
    state = ChatState(console, session, ranks=ranks)
    if ranks.sharded:
        console.info(f"m3mlx chat, {model.sharding.plan.describe()}: end with /quit "
                     "(mlx.launch never passes the end of stdin on)")
    if is_tty:
        interactive(state, f"m3mlx chat: {model_path} (thinking {thinking}). /help for "
                           "commands, Ctrl-D to leave.")
    else:
        piped(state, input_mode)
