"""Facts about this process that only /proc/self/status states exactly (Linux): its umask and its own peak
resident memory, each with a portable fallback elsewhere."""

from __future__ import annotations

import os
import resource
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


def user_umask() -> int:
    """The process's umask, read without changing it (/proc; elsewhere by setting and restoring it)."""
    value = proc_status("Umask")
    if value is not None:
        return int(value, 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, the high-water mark of its own address space.
    ru_maxrss is not: Linux carries the parent's high-water mark across fork and exec, so a merge started from a
    large process (a test runner, a notebook) would report the parent's peak."""
    value = proc_status("VmHWM")  # "1234 kB"
    if value is not None:
        return int(value.split()[0]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
