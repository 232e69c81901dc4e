"""The columns a hub data set is read by, checked before it is read: errors name the data set.

A data set from the hub (or a mirror, or a new revision of it) whose column was renamed would
otherwise fail as a bare ``KeyError: 'query'`` somewhere inside a loader, minutes into a paper run.
:func:`require_columns` names the data set, the split, the missing column and the columns there
are. A nested field is written ``column.field`` (Tülu's ``messages.role``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def require_columns(rows, columns: Iterable[str], dataset: str, split: str | None = None, hint: str = ""):
    """``rows`` unchanged, once each of ``columns`` is found in it; ValueError naming ``dataset``,
    ``split`` and the first missing column otherwise. ``rows``: a ``datasets`` Dataset or
    IterableDataset (its features are read, no record), or a list of dicts (its first record is
    read). A stream whose features are unknown is not checked."""
    schema = _schema(rows)
    if schema is None:
        return rows
    for column in columns:
        if not _has(schema, column.split(".")):
            where = f"{dataset} (split {split})" if split else dataset
            raise ValueError(f"{where} has no column {column!r}; its columns: {_describe(schema)}"
                             + (f" ({hint})" if hint else ""))
    return rows


def _schema(rows):
    """The rows' features (a mapping of column to feature), their first record, or None."""
    features = getattr(rows, "features", None)
    if features is not None:
        return features
    if isinstance(rows, Sequence) and rows and isinstance(rows[0], Mapping):
        return rows[0]
    return None


def _has(node, path: list[str]) -> bool:
    """Whether ``path`` leads through ``node``: mappings by key, lists (of features or of records)
    through their element."""
    if not path:
        return True
    inner = getattr(node, "feature", None)  # datasets' List / Sequence feature
    if inner is not None:
        return _has(inner, path)
    if isinstance(node, list):
        return bool(node) and _has(node[0], path)
    return isinstance(node, Mapping) and path[0] in node and _has(node[path[0]], path[1:])


def _describe(schema) -> list[str]:
    return sorted(schema) if isinstance(schema, Mapping) else [repr(schema)]
