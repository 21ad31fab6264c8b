"""Local HTTP servers started by tests and benchmarks (127.0.0.1 only)."""

from __future__ import annotations

import time
from typing import Any


def serve_until_interrupted(srv: Any) -> None:
    """Start ``srv`` (a server with ``start()`` / ``stop()`` / ``base_url``), print its address, serve until Ctrl-C:
    the ``main()`` of every server script here."""
    srv.start()
    print(f"serving {srv.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
