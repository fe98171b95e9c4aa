"""Saved states (run checkpoints, selector states) hold tensors and plain data only, and are read
without running anything.

A state is written with `torch.save` (a zip archive) and read with `torch.load(weights_only=True)`,
whose unpickler builds tensors, numbers, strings, lists and dicts and refuses every other object.
A file that is a bare pickle (the pre-zip torch format, or any `pickle.dump`) is refused before any
of it is unpickled; a zip whose pickle names any other object is refused by torch's unpickler.
Either refusal is `UnsafeStateError`: the file is not loaded, and the caller says so in one line.
A file that is merely damaged (truncated, not a state at all) is `UnreadableStateError`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mpts.training.atomic import atomic_file

PICKLE_PROTOCOL_OPCODE = b"\x80"


class UnreadableStateError(ValueError):
    """Damaged or not a saved state; `reason` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is unreadable ({reason})")
        self.path, self.reason = path, reason


class UnsafeStateError(ValueError):
    """Holds objects other than tensors and plain data: loading it could run code, so it is not loaded."""

    def __init__(self, path: Path):
        super().__init__(f"{path} holds objects other than tensors and plain data (a file from another program "
                         "or a crafted one); it is not loaded, since unpickling it could run code")
        self.path = path


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write `state` atomically (a unique temporary file renamed into place)."""
    with atomic_file(path) as handle:
        torch.save(state, handle)


def load_state(path: Path) -> Any:
    """The saved state at `path`, read with no code run; UnsafeStateError or UnreadableStateError otherwise."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(1)
    except OSError as error:
        raise UnreadableStateError(path, error.strerror or str(error)) from None
    if not zipfile.is_zipfile(path):
        if head == PICKLE_PROTOCOL_OPCODE:
            raise UnsafeStateError(path)
        raise UnreadableStateError(path, "not a torch zip archive")
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeStateError(path) from None
    except Exception as error:  # a damaged archive
        raise UnreadableStateError(path, " ".join(str(error).split())[:200]) from None
