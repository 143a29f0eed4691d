"""Crash-safe writes: every file and folder pocketlm writes appears whole or not at all.

A file is written to a hidden temp name beside its destination, fsynced, then renamed over it. A folder is
swapped in with two renames; `recover()` completes a swap that a crash interrupted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit it replaces `path`, on an exception it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    f = open(tmp, mode, encoding=None if "b" in mode else encoding, newline=None if "b" in mode else "")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> None:
    """Finish a folder swap that was interrupted between its two renames."""
    path = Path(path)
    old = old_path(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)  # the swap completed; only the cleanup was missed
        else:
            os.replace(old, path)  # the new folder never arrived: the previous one is still whole


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk, so a power cut after the rename cannot leave empty files."""
    for f in sorted(path.rglob("*")):
        if f.is_file() and not f.is_symlink():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            fsync_dir(f)
    fsync_dir(path)


def replace_dir(tmp: Path, dst: Path) -> None:
    """Move a fully written folder `tmp` to `dst`, replacing what was there."""
    recover(dst)
    fsync_tree(tmp)
    if dst.exists():
        os.replace(dst, old_path(dst))
        os.replace(tmp, dst)
        shutil.rmtree(old_path(dst))
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)
