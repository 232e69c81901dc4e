"""Checked access to the offline data folder (models, tokenizers, corpora for `mini` runs and tests).

The folder holds a ``SHA256SUMS`` file (``<hex digest>  ./<relative path>`` per line). Every file is
checked against it before use, so a missing, truncated or edited file fails loudly, naming itself
and the data root, instead of silently changing results.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

from experiments.paths import DEFAULT_DATA_ROOT

SUMS_FILE = "SHA256SUMS"


class OfflineDataError(RuntimeError):
    """A file under the data root is missing, unlisted in SHA256SUMS, or differs from its checksum."""


def _hint(data_root: Path) -> str:
    return (f"(data root {data_root}; pass data_root=<folder holding {SUMS_FILE}> to use another copy, "
            f"default {DEFAULT_DATA_ROOT})")


def read_checksums(data_root: str | Path) -> dict[str, str]:
    """{relative path without "./": expected SHA-256 hex digest} from ``data_root/SHA256SUMS``."""
    data_root = Path(data_root)
    sums = data_root / SUMS_FILE
    if not sums.is_file():
        raise OfflineDataError(f"no {SUMS_FILE} found {_hint(data_root)}")
    pairs = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    return {path.strip().removeprefix("./"): digest for digest, path in pairs}


@functools.lru_cache(maxsize=None)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """Hex digest of ``path``; size and mtime are in the cache key so an edited file is re-hashed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, hashed once per (path, size, mtime) within the process."""
    path = Path(path)
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def verify_files(data_root: str | Path, relative_paths: Iterable[str]) -> list[Path]:
    """Absolute paths of ``relative_paths`` under ``data_root``, each checked against SHA256SUMS.

    Raises OfflineDataError naming the first file that is unlisted, missing or altered. Digests are
    cached per (path, size, mtime) within the process, so repeated loads hash each file once.
    """
    data_root = Path(data_root).resolve()
    expected = read_checksums(data_root)
    paths = []
    for rel in relative_paths:
        rel = str(rel).removeprefix("./")
        path = data_root / rel
        if rel not in expected:
            raise OfflineDataError(f"{rel} is not listed in {SUMS_FILE} {_hint(data_root)}")
        if not path.is_file():
            raise OfflineDataError(f"{rel} is missing {_hint(data_root)}")
        if sha256_file(path) != expected[rel]:
            raise OfflineDataError(f"{rel} is altered: its SHA-256 differs from {SUMS_FILE} {_hint(data_root)}")
        paths.append(path)
    return paths
