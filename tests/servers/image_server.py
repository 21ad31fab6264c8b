"""A normal-and-hostile image server on 127.0.0.1 for the download-engine tests.

Routes (GET):

* ``/img/<n>.jpg``      a distinct small JPEG per ``n`` (64x48), after ``latency`` seconds
* ``/png``              an 80x60 RGBA PNG;  ``/large.jpg``  a 1200x900 JPEG (to be resized)
* ``/slow``             200 with Content-Length 1000, then one byte per second
* ``/slow-headers``     the status line, then the headers one byte per 0.5 s
* ``/huge``             ``Content-Length: 2000000000``, then a trickle; ``/stream-big``  5 MB without a length
* ``/html``, ``/svg``, ``/empty``   non-images served as ``image/jpeg``;  ``/truncated.jpg``  60 % of a JPEG
* ``/bomb/<w>x<h>.png`` a tiny PNG whose header claims ``w`` x ``h`` pixels
* ``/tiny.png`` (8x8), ``/aspect.png`` (400x20)
* ``/loop/a`` <-> ``/loop/b`` redirect loop; ``/chain/<n>`` n redirects then a JPEG;
  ``/redirect?to=<url>`` a 302 to any URL
* ``/noai.jpg``, ``/noimageai.jpg`` (``X-Robots-Tag``), ``/otherbot.jpg`` (``X-Robots-Tag: otherbot: noai``)
* ``/dup/<anything>.jpg`` the same bytes for every name;  ``/flaky/<n>.jpg`` 503 the first time, then an image
* anything else: 404

Every request is counted in ``hits`` (path -> count); the ``Host`` headers seen are kept in ``hosts``.
"""

from __future__ import annotations

import argparse
import functools
import io
import re
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image
from typing_extensions import Self


def _encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@functools.lru_cache(maxsize=4096)
def numbered_jpeg(n: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG whose pixels encode ``n`` (distinct bytes for distinct ``n``)."""
    im = Image.new("RGB", size, ((n * 37) % 256, (n * 91 + 7) % 256, (n // 256) % 256))
    im.putpixel((n % size[0], (n // size[0]) % size[1]), (255 - (n % 256), 0, 255))
    return _encode(im, "JPEG", quality=90)


@functools.cache
def sample(name: str) -> bytes:
    """The fixed bodies of the named routes."""
    if name == "png":
        im = Image.new("RGBA", (80, 60), (200, 30, 30, 255))
        im.paste((0, 0, 0, 0), (0, 0, 40, 60))
        return _encode(im, "PNG")
    if name == "large":
        im = Image.radial_gradient("L").resize((1200, 900)).convert("RGB")
        return _encode(im, "JPEG", quality=85)
    if name == "tiny":
        return _encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG")
    if name == "aspect":
        return _encode(Image.new("RGB", (400, 20), (9, 90, 200)), "PNG")
    if name == "truncated":
        full = _encode(Image.effect_noise((160, 120), 60).convert("RGB"), "JPEG", quality=90)
        return full[: int(len(full) * 0.6)]
    if name == "dup":
        return _encode(Image.new("RGB", (50, 50), (12, 34, 56)), "JPEG")
    raise KeyError(name)


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG of ~70 bytes whose header claims ``width`` x ``height`` (the data is not there)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>nothing here</body></html>"
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
       b'<rect width="100" height="100" fill="red"/></svg>')


class _Listener(ThreadingHTTPServer):
    daemon_threads = True
    # the listen backlog of a real server (nginx: 511), not socketserver's 5: with 16 download threads connecting at
    # once to a server thread starved by a loaded CPU, a full backlog drops SYNs, the client resends after 1 s, and a
    # row fails as "connect timed out after 2 s" in one run and not in the next (seen once in a clean-clone run)
    request_queue_size = 128


class ImageServer:
    """Start with ``with ImageServer() as srv: ... srv.url("/png") ...``.

    Args:
        latency: seconds slept before answering ``/img/<n>.jpg``.
        port: 0 picks a free port.
    """

    def __init__(self, *, latency: float = 0.0, port: int = 0) -> None:
        self.latency = latency
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.sent: Counter[str] = Counter()  # body bytes sent per path (streaming routes)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd = _Listener(("127.0.0.1", port), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def snapshot(self) -> Counter[str]:
        with self.lock:
            return Counter(self.hits)

    def start(self) -> ImageServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "image/jpeg",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def _redirect(self, location: str) -> None:
                self._send(302, b"", "text/plain", {"Location": location})

            def _trickle(self, path: str, delay: float, limit: int) -> None:
                for _ in range(limit):
                    if server.stopping.wait(delay):
                        break
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    with server.lock:
                        server.sent[path] += 1

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                path = parts.path
                with server.lock:
                    server.hits[path] += 1
                    n_hit = server.hits[path]
                    server.hosts.append(self.headers.get("Host", ""))
                try:
                    self._route(path, parts.query, n_hit)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def _route(self, path: str, query: str, n_hit: int) -> None:
                if m := re.fullmatch(r"/img/(\d+)\.jpg", path):
                    if server.latency:
                        time.sleep(server.latency)
                    return self._send(200, numbered_jpeg(int(m.group(1))))
                if path == "/png":
                    return self._send(200, sample("png"), "image/png")
                if path == "/large.jpg":
                    return self._send(200, sample("large"))
                if path == "/slow":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.flush()
                    self._trickle(path, 1.0, 1000)
                    self.close_connection = True
                    return None
                if path == "/slow-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    self.wfile.flush()
                    for c in b"Content-Type: image/jpeg\r\nX-Padding: " + b"p" * 200:
                        if server.stopping.wait(0.5):
                            break
                        self.wfile.write(bytes([c]))
                        self.wfile.flush()
                    self.close_connection = True
                    return None
                if path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "2000000000")
                    self.end_headers()
                    self.wfile.flush()
                    self._trickle(path, 0.2, 50)
                    self.close_connection = True
                    return None
                if path == "/stream-big":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    block = b"\xff" * 65536
                    for _ in range(80):
                        self.wfile.write(block)
                        with server.lock:
                            server.sent[path] += len(block)
                    self.close_connection = True
                    return None
                if path == "/html":
                    return self._send(200, HTML)
                if path == "/svg":
                    return self._send(200, SVG, "image/svg+xml")
                if path == "/empty":
                    return self._send(200, b"")
                if path == "/truncated.jpg":
                    return self._send(200, sample("truncated"))
                if m := re.fullmatch(r"/bomb/(\d+)x(\d+)\.png", path):
                    return self._send(200, bomb_png(int(m.group(1)), int(m.group(2))), "image/png")
                if path == "/tiny.png":
                    return self._send(200, sample("tiny"), "image/png")
                if path == "/aspect.png":
                    return self._send(200, sample("aspect"), "image/png")
                if path == "/loop/a":
                    return self._redirect("/loop/b")
                if path == "/loop/b":
                    return self._redirect(server.url("/loop/a"))
                if m := re.fullmatch(r"/chain/(\d+)", path):
                    k = int(m.group(1))
                    return self._redirect(f"/chain/{k - 1}") if k > 0 else self._send(200, numbered_jpeg(7777))
                if path == "/redirect":
                    return self._redirect(parse_qs(query).get("to", ["/"])[0])
                if path in ("/noai.jpg", "/noimageai.jpg", "/otherbot.jpg"):
                    tag = {"/noai.jpg": "noai", "/noimageai.jpg": "noindex, noimageai",
                           "/otherbot.jpg": "otherbot: noai"}[path]
                    return self._send(200, numbered_jpeg(9999), headers={"X-Robots-Tag": tag})
                if re.fullmatch(r"/dup/[\w-]+\.jpg", path):
                    return self._send(200, sample("dup"))
                if m := re.fullmatch(r"/flaky/(\d+)\.jpg", path):
                    if n_hit == 1:
                        return self._send(503, b"busy", "text/plain")
                    return self._send(200, numbered_jpeg(50000 + int(m.group(1))))
                return self._send(404, b"not found", "text/plain")

        return Handler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before every /img/<n>.jpg answer")
    args = ap.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also when run as a script: tests/ on the path
    from servers import serve_until_interrupted

    serve_until_interrupted(ImageServer(latency=args.latency, port=args.port))


if __name__ == "__main__":
    main()
