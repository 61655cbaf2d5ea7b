"""Atomic file writes: a file is written next to its destination, then renamed onto it.

``os.replace`` within one folder swaps the name in one step, so a reader, or whatever is left
after a crash, sees the previous file or the complete new one, never half of one. Checkpoints,
ONNX exports and the demo's report files are written this way; the integer export, a folder,
does the same with a temporary folder (:mod:`quantwire.backend.export`).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "temporary_sibling"]


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A name for a hidden temporary entry in ``path``'s folder, unique to this call: renaming
    it onto ``path`` is atomic because both are in the same file system."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Have ``write(temporary)`` fill a new empty file next to ``path``, flush it to disk and
    rename it onto ``path``; returns ``path``.

    Whatever ``write`` raises (or a failing rename) propagates with ``path`` untouched and the
    temporary file removed. The file gets the permissions a plain ``open(path, "w")`` would
    give (``tempfile.mkstemp`` would make it private to its owner). A missing folder raises
    :class:`FileNotFoundError` before ``write`` is called.
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    with open(temporary, "xb"):
        pass
    try:
        write(temporary)
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _flush_folder_to_disk(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`); returns ``path``."""
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _flush_to_disk(path: Path) -> None:
    """Force ``path``'s bytes to disk, so that after a power loss the renamed file is not empty."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _flush_folder_to_disk(folder: Path) -> None:
    """Force the rename itself to disk (POSIX; some file systems refuse and that is harmless:
    the rename already happened, only its durability across a power loss is at stake)."""
    if os.name != "posix":
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
