"""This process's memory, read from /proc (Linux): the resident set now and at its peak, the peak reset at the start of
each export phase so that every phase reports its own, and what the machine has available. Elsewhere: None."""

from __future__ import annotations

from pathlib import Path


def _status_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def resident() -> int | None:
    """Resident set size now, in bytes."""
    return _status_bytes("VmRSS")


def peak_resident() -> int | None:
    """The highest resident set size since the process started or the last reset_peak(), in bytes."""
    return _status_bytes("VmHWM")


def reset_peak() -> None:
    """Start a new peak from the current resident set (Linux: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then counts from the process's start


def available() -> int | None:
    """Memory the machine can give without swapping (MemAvailable), in bytes."""
    return _status_bytes("MemAvailable", "/proc/meminfo")


def size_text(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"
