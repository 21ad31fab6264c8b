"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for tests and the throughput benchmark.

It speaks ``POST /v1/chat/completions`` (and ``GET /v1/models``) well enough for the official ``openai``
client. What it answers is decided per request by a *responder* ``fn(request_no, class_name, prompt, body) ->
Reply``; the default one lists ``n`` synthetic neighbours of the class named in the paper's prompt. It can add a
fixed latency per request (to emulate an LLM), and it can "die" after a number of answers: from then on every
request is dropped without a response and the listening socket is closed. With ``reject_response_format`` it
answers HTTP 400 to any request carrying ``response_format`` (as servers without JSON mode do); the default
responder honours ``response_format={"type": "json_object"}`` with ``{"categories": [...]}``. The class name is
taken from the first message that holds the paper's prompt, so follow-up turns keep it.

Run standalone: ``python tests/servers/chat_server.py --port 8765 --latency 0.05``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from typing_extensions import Self

_CLASS_RE = re.compile(r'Provided category: "([^"\n]*)"\. You should return:\s*$')
_N_RE = re.compile(r"contains (\d+) visually similar")


@dataclass
class Reply:
    """One scripted answer: ``content`` as the assistant message, or a raw ``status``/``body``; ``drop`` closes
    the connection without answering; ``delay`` seconds are slept first."""

    content: str = ""
    status: int = 200
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    finish_reason: str = "stop"  # "length": the answer was cut at the token limit


Responder = Callable[[int, str, str, dict], Reply]


def synthetic_neighbours(name: str, n: int) -> list[str]:
    """Deterministic neighbour names for ``name``: ``"<name> lookalike 1"``, ..."""
    return [f"{name} lookalike {i + 1}" for i in range(n)]


def default_responder(request_no: int, class_name: str, prompt: str, body: dict) -> Reply:
    m = _N_RE.search(json.dumps(body.get("messages", [])))
    n = int(m.group(1)) if m else 5
    names = synthetic_neighbours(class_name, n)
    if (body.get("response_format") or {}).get("type") == "json_object":
        return Reply(content=json.dumps({"categories": names}))
    return Reply(content=json.dumps(names))


class ChatServer:
    """Start with ``with ChatServer(responder) as srv: ... srv.base_url ...``; counts requests in ``srv.calls``."""

    def __init__(self, responder: Responder | None = None, *, latency: float = 0.0, die_after: int | None = None,
                 port: int = 0, model: str = "local-test-model", reject_response_format: bool = False) -> None:
        self.responder = responder or default_responder
        self.reject_response_format = reject_response_format
        self.bodies: list[dict] = []  # every parsed chat request body
        self.latency = latency
        self.die_after = die_after
        self.model = model
        self.calls: list[str] = []  # class name of every chat request received (answered or not)
        self.auth: set[str] = set()  # Authorization headers seen (tests check the key reached the server only)
        self.answered = 0
        self.dead = False
        self.lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def die(self) -> None:
        """From now on drop every request; close the listening socket (in the background)."""
        self.dead = True
        threading.Thread(target=self.stop, daemon=True).start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self.dead:
            self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # one small response must not wait for a delayed ACK

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self) -> None:
                if server.dead:
                    self.close_connection = True
                    return
                body = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "test"}]}
                self._send(200, json.dumps(body).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if server.dead or not self.path.rstrip("/").endswith("/chat/completions"):
                    self.close_connection = True
                    if not server.dead:
                        self._send(404, b'{"error": {"message": "not found"}}')
                    return
                try:
                    req = json.loads(raw)
                    prompt = req["messages"][-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    self._send(400, b'{"error": {"message": "bad request"}}')
                    return
                name = ""
                for msg in req["messages"]:
                    content = msg.get("content") if isinstance(msg, dict) else None
                    m = _CLASS_RE.search(content.split("\nAnswer with", 1)[0]) if isinstance(content, str) else None
                    if m:
                        name = m.group(1)
                        break
                with server.lock:
                    no = len(server.calls)
                    server.calls.append(name)
                    server.bodies.append(req)
                    server.auth.add(self.headers.get("Authorization", ""))
                if server.reject_response_format and "response_format" in req:
                    self._send(400, b'{"error": {"message": "response_format is not supported", '
                                    b'"type": "invalid_request_error"}}')
                    return
                reply = server.responder(no, name, prompt, req)
                delay = server.latency + reply.delay
                if delay > 0:
                    time.sleep(delay)
                if reply.drop or server.dead:
                    self.close_connection = True
                    return
                if reply.body is not None or reply.status != 200:
                    self._send(reply.status, reply.body if reply.body is not None else
                               json.dumps({"error": {"message": f"status {reply.status}"}}).encode(), reply.headers)
                    return
                content = reply.content
                body = {
                    "id": f"chatcmpl-{no}", "object": "chat.completion", "created": int(time.time()),
                    "model": req.get("model", server.model),
                    "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                              "total_tokens": len(prompt.split()) + len(content.split())},
                }
                self._send(200, json.dumps(body).encode(), reply.headers)
                with server.lock:
                    server.answered += 1
                    if server.die_after is not None and server.answered >= server.die_after and not server.dead:
                        server.die()

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed on the first line)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    args = ap.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also when run as a script: tests/ on the path
    from servers import serve_until_interrupted

    serve_until_interrupted(ChatServer(latency=args.latency, port=args.port))


if __name__ == "__main__":
    main()
