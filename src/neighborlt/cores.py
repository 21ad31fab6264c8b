"""CPU cores this process may run on: the one count behind the downloader's processes, the loader workers and the
CPU trainings that run at once."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a cgroup or ``taskset``; ``os.cpu_count()`` where
    the platform has no affinity call), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


__all__ = ["available_cores"]
