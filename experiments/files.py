"""Whole-file writes that a crash cannot tear: a temp file beside the target, fsync, ``os.replace``.

Run folders, checkpoints, evaluation results, spectra and the tokenizer cache are all written this
way, so a reader (another rank, a resumed run, an analysis notebook) sees the old file or the
complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    If ``write`` raises, the temp file is removed and ``path`` keeps its old contents (or stays
    absent). The temp file is opened normally, not by ``mkstemp``, so it gets the umask's mode.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every filesystem lets a directory be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` streamed into a temp file and renamed over ``path``: a checkpoint is either
    the old one or the complete new one. torch is imported here so readers need not have it."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
