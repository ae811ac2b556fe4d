"""This process's memory, read from /proc (Linux): the resident set now and at its peak, the peak reset at the start of
each export phase so that every phase reports its own, and what the machine has available. Elsewhere: None."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from pathlib import Path

import numpy as np

MADV_DONTNEED = 4  # Linux
MADV_POPULATE_READ = 22  # Linux 5.14+: map a range's pages in one call instead of a fault per page
HUGE_PAGE = 2 << 20


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


def file_backed(address: int) -> bool:
    """Whether `address` lies in a mapping of a file (a memory-mapped checkpoint), read from /proc/self/maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return len(fields) == 6 and fields[5].startswith("/")
    return False


def drop_file_pages(address: int, length: int) -> int:
    """Unmap the whole pages of [address, address + length) from this process when they map a file: the pages stay in
    the file (and the page cache) and come back on the next read, but no longer count as this process's memory.
    Returns the bytes dropped (0 off Linux, or for memory that is not a file's)."""
    if length <= 0 or not file_backed(address):
        return 0
    return drop_pages(address, length)


def drop_pages(address: int, length: int) -> int:
    """drop_file_pages for memory the caller knows to be a file's mapping (MADV_DONTNEED: never call it on memory of
    the process's own, whose contents it would discard). Returns the bytes dropped."""
    page = mmap.PAGESIZE
    first, last = -(-address // page) * page, (address + length) // page * page
    if last <= first:
        return 0
    if _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first


def populate(address: int, length: int) -> None:
    """Map the pages of a file-backed range (a memory-mapped checkpoint) into the process in one call before reading it
    through; a hint only (older kernels and other systems: nothing happens)."""
    page = mmap.PAGESIZE
    first = address // page * page
    if length > 0 and sys.platform.startswith("linux"):
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(address + length - first), MADV_POPULATE_READ)


def huge_page_block(size: int) -> np.ndarray:
    """`size` bytes of anonymous memory (uint8), asked to be backed by huge pages (a hint: transparent huge pages in
    "madvise" or "always" mode)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux
        return np.empty(max(size, 1), np.uint8)
    block = mmap.mmap(-1, max(size, 1) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared is shmem
    block.madvise(mmap.MADV_HUGEPAGE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(block)) % HUGE_PAGE  # aligned to a huge page
    return np.frombuffer(block, np.uint8, count=max(size, 1), offset=start)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
