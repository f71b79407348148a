"""`servelm chat [MODEL | --url URL]`: a terminal chat with streamed replies and history.

With ``--url`` it talks to a running server through /v1/chat/completions; without, it runs the
in-process Engine. ``/exit`` quits, ``/clear`` forgets the conversation, EOF (Ctrl-D) exits and
Ctrl-C stops the reply being written.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional, Protocol, TextIO

Message = dict[str, str]


class ChatError(Exception):
    """A reply failed (server error, prompt too long); the conversation goes on."""


class ChatBackend(Protocol):
    def stream(self, messages: list[Message]) -> Iterator[str]:
        """Text deltas of the assistant's reply to ``messages``."""
        ...


def add_chat_parser(sub: Any) -> argparse.ArgumentParser:
    from servelm.config import EngineArgs
    p = sub.add_parser("chat", help="chat in the terminal, in-process or with a server (--url)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EngineArgs.add_cli_args(p)
    p.add_argument("--url", default=None,
                   help="a running server, e.g. http://127.0.0.1:8000 (then MODEL, if given, "
                        "is the model name to ask for)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="reply length limit (default: the rest of the context)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.set_defaults(func=main_chat)
    return p


# ---- backends --------------------------------------------------------------------------------
class HTTPChatBackend:
    """Streams from /v1/chat/completions with the standard library (no client dependency)."""

    def __init__(self, url: str, model: Optional[str], api_key: Optional[str],
                 sampling: dict[str, Any], timeout_s: float = 600.0) -> None:
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.sampling, self.timeout_s = sampling, timeout_s
        self.model = model or self._first_model()

    def _open(self, path: str, body: Optional[dict] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ChatError(_error_message(e.read(), f"HTTP {e.code}")) from None
        except (urllib.error.URLError, OSError) as e:
            raise ChatError(f"cannot reach {self.base}: {getattr(e, 'reason', e)}") from None

    def _first_model(self) -> str:
        with self._open("/v1/models") as r:
            data = json.load(r).get("data") or []
        if not data:
            raise ChatError(f"{self.base}/v1/models lists no model.")
        return data[0]["id"]

    def stream(self, messages: list[Message]) -> Iterator[str]:
        body = {"model": self.model, "messages": messages, "stream": True, **self.sampling}
        with self._open("/v1/chat/completions", body) as r:
            for raw in r:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(_error_message(data.encode(), "the server failed"))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


class EngineChatBackend:
    """Runs the in-process Engine: one request at a time, stepped until it finishes."""

    def __init__(self, engine: Any, sampling: dict[str, Any]) -> None:
        tok = engine.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise ValueError("this model has no chat template; `servelm chat` needs one.")
        self.engine, self.sampling = engine, sampling
        self._ids = itertools.count()

    def stream(self, messages: list[Message]) -> Iterator[str]:
        from servelm.sampling_params import SamplingParams
        tok = self.engine.tokenizer
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rid = f"chat-{next(self._ids)}"
        try:
            self.engine.add_request(rid, prompt, SamplingParams(**self.sampling),
                                    add_special_tokens=False)
        except ValueError as e:
            raise ChatError(str(e)) from None
        sent, finished = 0, False
        try:
            while not finished and self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        text = out.outputs[0].text
                        if len(text) > sent:
                            yield text[sent:]
                            sent = len(text)
                        finished = out.finished
        finally:
            if not finished:
                self.engine.abort_request(rid)


def _error_message(body: bytes, fallback: str) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return fallback


# ---- the loop --------------------------------------------------------------------------------
def chat_loop(backend: ChatBackend, system: Optional[str], stdin: TextIO = sys.stdin,
              stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = stdin.isatty()
    print("servelm chat: /exit quits, /clear forgets the conversation", file=stderr)
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/clear":
            history = list(start)
            print("(conversation cleared)", file=stderr)
            continue
        history.append({"role": "user", "content": text})
        reply: list[str] = []
        try:
            for delta in backend.stream(history):
                stdout.write(delta)
                stdout.flush()
                reply.append(delta)
        except ChatError as e:
            print(f"error: {e}", file=stderr)
            history.pop()
            continue
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply)})


def _read_line(stdin: TextIO, interactive: bool) -> str:
    """A line with its newline, or "" at EOF; a terminal gets input()'s line editing."""
    if not interactive:
        return stdin.readline()
    try:
        return input("> ") + "\n"
    except EOFError:
        return ""


def main_chat(args: argparse.Namespace) -> int:
    sampling: dict[str, Any] = {"temperature": args.temperature, "top_p": args.top_p}
    if args.url:
        if args.max_tokens is not None:
            sampling["max_completion_tokens"] = args.max_tokens
        try:
            backend: ChatBackend = HTTPChatBackend(args.url, args.model, args.api_key, sampling)
        except ChatError as e:
            raise ValueError(str(e)) from None
    else:
        from servelm.config import EngineArgs
        from servelm.engine.engine import Engine
        sampling["max_tokens"] = args.max_tokens
        backend = EngineChatBackend(Engine.from_engine_args(EngineArgs.from_cli_args(args)),
                                    sampling)
    return chat_loop(backend, args.system)
