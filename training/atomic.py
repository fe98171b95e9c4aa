"""Writes that land whole or not at all, and never through a link planted in the folder.

`atomic_file(path)` creates a new temporary file beside `path` with a unique name and O_EXCL (so a
symbolic link planted under any `.tmp` name is never opened, let alone written through), yields it
open for binary writing, then renames it onto `path` (a link at `path` itself is replaced, not
followed). If the write fails the temporary file is removed; a full disk becomes `DiskFullError`,
one line naming the file.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(ValueError):
    """A write failed for want of space; the message names the file."""


def disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it: torch wraps the OSError of its writer) is a full disk."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: Path) -> DiskFullError:
    return DiskFullError(f"no space left on device writing {path}; free some space, then resume the run "
                         "(everything written before is kept)")


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    path = Path(path)
    fd, tmp = _create_exclusive(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(error):
            raise disk_full_error(path) from None
        raise


def _create_exclusive(path: Path) -> tuple[int, Path]:
    """A new file `<name>.<random>.tmp` beside `path`: O_EXCL fails on any existing name, a link
    included. (Not `tempfile.mkstemp`: its files are 0600, where run files keep the user's umask.)"""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as error:
            if disk_full(error):
                raise disk_full_error(path) from None
            raise
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)
