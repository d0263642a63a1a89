"""Facts about this process that only /proc/self/status states exactly (Linux): its umask and its own peak
resident memory. Elsewhere each caller falls back to the portable call."""

from __future__ import annotations

from pathlib import Path


def proc_status(field: str) -> str | None:
    """The value of `field` (e.g. "Umask", "VmHWM") in /proc/self/status, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field:
                return value.strip()
    except OSError:
        pass
    return None
