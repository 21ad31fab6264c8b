"""Fetch one URL with hard limits: connect/read/total time-outs, a byte cap, a redirect cap, X-Robots-Tag.

Every URL and every redirect target goes through the address guard (:func:`guard.check_url`) and the request
is sent to the checked address (:func:`guard.pinned_connection`). The total time-out is a deadline for the
whole fetch, redirects included: a shared watchdog thread shuts the socket down when it passes, so a server
trickling one byte per second (in the headers or the body) cannot hold a worker longer than ``total_timeout``.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from .guard import Refused, Resolver, check_url, pinned_connection, split_url

DEFAULT_USER_AGENT = "neighborlt/0.1 (long-tail image retrieval for research; honours X-Robots-Tag noai)"
ROBOTS_DIRECTIVES = ("noai", "noimageai")
REDIRECT_CODES = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024


@dataclass
class FetchResult:
    """The outcome of :func:`fetch`.

    Attributes:
        url: the requested URL.
        status: ``"ok"`` or a short failure code (``timeout``, ``too_large``, ``redirects``, ``robots``,
            ``http_404``, ``blocked_address``, ``bad_scheme``, ``dns_error``, ``connect_error``, ``read_error``).
        error: a human-readable reason ("" when ok).
        data: the body bytes when ok.
        final_url: the URL after redirects.
        http_status: the last HTTP status received, if any.
        content_type: the final response's Content-Type header.
        redirects: how many redirects were followed.
        elapsed: seconds spent.
    """

    url: str
    status: str
    error: str = ""
    data: bytes | None = None
    final_url: str = ""
    http_status: int | None = None
    content_type: str | None = None
    redirects: int = 0
    elapsed: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Watchdog:
    """One daemon thread that shuts down sockets whose deadline passed (shared by all fetches)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._socks: dict[int, socket.socket] = {}
        self._expired: set[int] = set()
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, sock: socket.socket) -> int:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="neighborlt-fetch-watchdog", daemon=True)
                self._thread.start()
            token = next(self._ids)
            self._socks[token] = sock
            heapq.heappush(self._heap, (deadline, token))
            self._cv.notify()
            return token

    def unwatch(self, token: int) -> bool:
        """Stop watching; True when the deadline had already fired for this socket."""
        with self._cv:
            self._socks.pop(token, None)
            if token in self._expired:
                self._expired.discard(token)
                return True
            return False

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._heap and self._heap[0][1] not in self._socks:
                    heapq.heappop(self._heap)  # unwatched: drop lazily
                if not self._heap:
                    self._cv.wait()
                    continue
                deadline, token = self._heap[0]
                now = time.monotonic()
                if deadline > now:
                    self._cv.wait(deadline - now)
                    continue
                heapq.heappop(self._heap)
                sock = self._socks.pop(token, None)
                if sock is None:
                    continue
                self._expired.add(token)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_WATCHDOG = _Watchdog()


def _new_watchdog_after_fork() -> None:
    """A forked download worker starts with a fresh watchdog (the parent's thread and lock state are not its own)."""
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_watchdog_after_fork)


class _Deadline(Exception):
    pass


def robots_disallowed(header_values: Iterable[str], user_agent_token: str,
                      directives: Sequence[str] = ROBOTS_DIRECTIVES) -> bool:
    """True when an ``X-Robots-Tag`` value forbids use (img2dataset's rule).

    A value is ``"d1, d2"`` (for every crawler) or ``"token: d1, d2"`` (only for the crawler named ``token``).

    Args:
        header_values: every ``X-Robots-Tag`` header of the response.
        user_agent_token: this crawler's token (lower case), e.g. ``"neighborlt"``.
        directives: the directives that forbid use.

    Returns:
        Whether one of ``directives`` applies to this crawler.
    """
    wanted = {d.lower() for d in directives}
    for value in header_values:
        head, sep, tail = value.partition(":")
        token = head.strip().lower() if sep else None
        parts = tail if sep else head
        if token is not None and token not in (user_agent_token, "*"):
            continue
        if any(p.strip().lower() in wanted for p in parts.split(",")):
            return True
    return False


def user_agent_token(user_agent: str) -> str:
    """The product token of a user agent string (``"neighborlt/0.1 (...)"`` -> ``"neighborlt"``)."""
    return user_agent.strip().split("/", 1)[0].split(" ", 1)[0].lower()


def fetch(url: str, *, connect_timeout: float = 10.0, read_timeout: float = 10.0, total_timeout: float = 30.0,
          max_bytes: int = 20 * 1024 * 1024, max_redirects: int = 5, honor_robots: bool = True,
          robots_directives: Sequence[str] = ROBOTS_DIRECTIVES, allow_hosts: Iterable[str] = (),
          user_agent: str = DEFAULT_USER_AGENT, resolve: Resolver | None = None,
          ssl_context: ssl.SSLContext | None = None) -> FetchResult:
    """GET ``url`` within the limits; never raises for network or server misbehaviour.

    Args:
        url: absolute http(s) URL.
        connect_timeout: seconds to open the TCP (and TLS) connection.
        read_timeout: seconds one socket read may wait for data.
        total_timeout: seconds for the whole fetch, redirects included (a hard deadline).
        max_bytes: largest accepted body in bytes (a larger Content-Length is refused before reading).
        max_redirects: redirects followed at most (a loop is refused at once).
        honor_robots: refuse responses whose ``X-Robots-Tag`` carries one of ``robots_directives``.
        robots_directives: directives that forbid use (default ``noai``, ``noimageai``).
        allow_hosts: hosts/IPs/networks exempt from the address guard (see :func:`guard.check_url`).
        user_agent: the ``User-Agent`` header; its product token is matched against ``X-Robots-Tag`` tokens.
        resolve: injectable resolver ``fn(host, port) -> [ip, ...]``.
        ssl_context: TLS context for https URLs (default: verified system context).

    Returns:
        A :class:`FetchResult`; ``status == "ok"`` with ``data`` on success.
    """
    start = time.monotonic()
    deadline = start + total_timeout
    allow = tuple(allow_hosts)
    token = user_agent_token(user_agent)
    res = FetchResult(url=url, status="error", final_url=url)
    seen = {url}
    current = url
    try:
        while True:
            resp_info = _fetch_once(current, deadline, connect_timeout, read_timeout, max_bytes, allow, user_agent,
                                    resolve, ssl_context, res)
            if resp_info is None:  # a terminal result was set on res
                break
            location = resp_info
            if res.redirects >= max_redirects:
                res.status, res.error = "redirects", f"more than {max_redirects} redirects (last to {location})"
                break
            nxt = urljoin(current, location)
            if nxt in seen:
                res.status, res.error = "redirects", f"redirect loop back to {nxt}"
                break
            seen.add(nxt)
            res.redirects += 1
            current = res.final_url = nxt
        if res.ok and honor_robots and robots_disallowed(_all(res.headers, "x-robots-tag"), token, robots_directives):
            res.status, res.error, res.data = "robots", f"X-Robots-Tag forbids use: {res.headers['x-robots-tag']}", None
    except Refused as e:
        res.status, res.error, res.data = e.code, e.reason, None
    except _Deadline:
        res.status, res.error, res.data = "timeout", f"total time-out of {total_timeout:g} s exceeded", None
    res.elapsed = time.monotonic() - start
    return res


def _all(headers: dict[str, str], name: str) -> list[str]:
    v = headers.get(name)
    return [] if v is None else v.split("\n")


def _connect(scheme: str, host: str, port: int, ips: list[Any], deadline: float, connect_timeout: float,
             read_timeout: float, ssl_context: ssl.SSLContext | None
             ) -> tuple[http.client.HTTPConnection | None, tuple[str, str]]:
    """Open a pinned connection to the first checked address that answers (the others are tried in order)."""
    failure = ("connect_error", f"cannot connect to {host}")
    for ip in ips:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        conn = pinned_connection(scheme, host, port, ip, connect_timeout=min(connect_timeout, remaining),
                                 read_timeout=min(read_timeout, remaining), ssl_context=ssl_context)
        try:
            conn.connect()
            return conn, ("ok", "")
        except TimeoutError:
            conn.close()
            if time.monotonic() >= deadline:
                raise _Deadline from None
            failure = ("timeout", f"connect to {host} ({ip}) timed out after {connect_timeout:g} s")
        except ssl.SSLError as e:
            conn.close()
            return None, ("tls_error", f"TLS with {host} failed ({e.__class__.__name__}: {e})")
        except OSError as e:
            conn.close()
            failure = ("connect_error", f"cannot connect to {host} ({ip}): {e}")
    return None, failure


def _fetch_once(url: str, deadline: float, connect_timeout: float, read_timeout: float, max_bytes: int,
                allow: tuple[str, ...], user_agent: str, resolve: Resolver | None, ssl_context: ssl.SSLContext | None,
                res: FetchResult) -> str | None:
    """One request; returns the redirect ``Location`` or None once ``res`` holds a terminal status."""
    scheme, host, port = split_url(url)
    ips = check_url(url, allow, resolve)
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn, failure = _connect(scheme, host, port, ips, deadline, connect_timeout, read_timeout, ssl_context)
    if conn is None:
        res.status, res.error = failure
        return None
    watch: int | None = None
    fired = False
    try:
        assert conn.sock is not None
        watch = _WATCHDOG.watch(deadline, conn.sock)
        try:
            conn.putrequest("GET", target, skip_accept_encoding=True)
            conn.putheader("User-Agent", user_agent)
            conn.putheader("Accept", "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.9,*/*;q=0.5")
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            conn.endheaders()
            resp = conn.getresponse()
            res.http_status = resp.status
            headers: dict[str, str] = {}
            for k, v in resp.getheaders():
                k = k.lower()
                headers[k] = f"{headers[k]}\n{v}" if k in headers else v
            res.headers = headers
            res.content_type = headers.get("content-type")
            if resp.status in REDIRECT_CODES:
                location = headers.get("location", "").split("\n")[0].strip()
                if not location:
                    res.status, res.error = f"http_{resp.status}", "redirect without a Location header"
                    return None
                return location
            if resp.status != 200:
                res.status, res.error = f"http_{resp.status}", f"HTTP {resp.status} {resp.reason}".strip()
                return None
            length = headers.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                res.status, res.error = "too_large", f"Content-Length {int(length)} exceeds the cap of {max_bytes} bytes"
                return None
            buf = bytearray()
            while True:
                if time.monotonic() >= deadline:
                    raise _Deadline
                chunk = resp.read1(CHUNK)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > max_bytes:
                    res.status, res.error = "too_large", f"body exceeds the cap of {max_bytes} bytes"
                    return None
            if time.monotonic() >= deadline:
                raise _Deadline
            if length is not None and length.strip().isdigit() and len(buf) < int(length):
                res.status, res.error = "read_error", f"body truncated: {len(buf)} of {int(length)} bytes"
                return None
            res.status, res.data = "ok", bytes(buf)
            return None
        except TimeoutError:
            if time.monotonic() >= deadline:
                raise _Deadline from None
            res.status, res.error = "timeout", f"read from {host} timed out after {read_timeout:g} s"
            return None
        except (http.client.HTTPException, OSError) as e:
            if watch is not None and _WATCHDOG.unwatch(watch):
                fired, watch = True, None
            if fired or time.monotonic() >= deadline:
                raise _Deadline from None
            what = e.__class__.__name__
            res.status, res.error = "read_error", f"reading from {host} failed ({what}: {e})".replace("\n", " ")
            return None
    finally:
        if watch is not None and _WATCHDOG.unwatch(watch) and res.status == "ok":
            res.status, res.data = "timeout", None
            res.error = "total time-out exceeded"
        conn.close()


def result_dict(res: FetchResult) -> dict[str, Any]:
    """The JSON-able fields of a :class:`FetchResult` (no body, no headers)."""
    return {"url": res.url, "final_url": res.final_url, "status": res.status, "error": res.error,
            "http_status": res.http_status, "content_type": res.content_type, "redirects": res.redirects,
            "elapsed": round(res.elapsed, 4)}
