"""Output directories that appear whole or not at all (exports, golden vectors).

    out = check_destination(Path("out"), force=False)   # fail before any slow work
    with staged(out, force=False) as staging:            # write into `staging`
        ...                                               # renamed to `out` on success, removed on any error
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kvgraph.graphs.errors import KvgraphError


def check_destination(out: Path, force: bool) -> Path:
    """The absolute output path, or a KvgraphError saying why nothing can be written there."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise KvgraphError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise KvgraphError(f"{out}: exists and is not empty; pass --force to replace it")
    parent = _existing_ancestor(out.parent)  # missing parents are created when writing starts
    if not parent.is_dir():
        raise KvgraphError(f"{parent}: exists and is not a directory, cannot create {out}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KvgraphError(f"{parent}: not writable, cannot create {out.relative_to(parent)}")
    return out


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block succeeds."""
    out = check_destination(out, force)
    created = _make_parents(out.parent)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
        try:
            yield staging
            _publish(staging, out, force)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # also on KeyboardInterrupt: nothing half-written
            raise
    except BaseException:
        for directory in created:  # the parents this export made, deepest first, if still empty
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing parents of the output (like save_pretrained); returns them deepest first."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        directory.mkdir()
    return missing


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Move the finished staging directory to `out`, replacing an old one only at the very end."""
    if out.exists():
        if not force and any(out.iterdir()):
            raise KvgraphError(f"{out}: appeared while it was being written and is not empty; pass --force to replace it")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
