"""One writer per run folder: an exclusive `flock` on `RUN/.lock`, held while a process writes the run.

The kernel drops the lock when its holder exits however it exits (kill -9 included), so a lock left
by a dead process is never in the way; the lock file itself stays (an empty file; removing it would
let two writers lock two different files). It is opened without following links and never written.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another process is writing the run folder."""


class RunLock:
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op if this object holds it); refuse at once if another process does."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as error:
            why = "a symbolic link; it must be a plain file" if error.errno == errno.ELOOP else error.strerror
            raise RunLockedError(f"cannot open the run folder's lock {self.path}: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is being written by another process (it holds "
                                 f"{self.path}); wait for that run to finish or stop it, then try again") from None
        except OSError as error:
            if error.errno not in UNSUPPORTED:
                os.close(fd)
                raise
            # a file system without flock (some network mounts): run, but nothing stops a second writer
            logger.warning("%s: this file system cannot lock files (%s); make sure no other process writes "
                           "this run", self.path, error.strerror)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing drops the flock
