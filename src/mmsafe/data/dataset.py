"""The dataset every part of mmsafe shares.

Rows are ``{id, <modality>: value, label, group?, split?, meta}``. Modalities are named columns
(``image``, ``text``; later ``audio`` and more), so a new modality adds a column, not a code path.
Storage is columnar: one sequence per modality, one array of labels. A modality column (and
``meta``) is either a list of values in memory or a :class:`~mmsafe.data.columns.LazyColumn`
that produces them on access (a manifest's image files, a large world's pixels), so data larger
than memory costs only its small per-row metadata.

Conventions:
    * ``image`` values are ``uint8`` arrays of shape ``(H, W, 3)``.
    * ``text`` values are ``str``.
    * ``labels[i] == -1`` means the row carries no label (unlabelled, or an OOD item whose class
      is outside ``classes``); checks that need labels use only labelled rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmsafe.data.columns import is_lazy

UNLABELLED = -1


@dataclass(frozen=True)
class SkippedRow:
    """A row left out by ``--skip-invalid``, with why.

    Attributes:
        row: 1-based row number in the manifest (the header of a CSV is row 0).
        field: the offending field.
        reason: what is wrong with it.
        id: the row's id where it had one.
    """

    row: int
    field: str
    reason: str
    id: str | None = None


@dataclass
class Dataset:
    """A labelled multimodal dataset held column-wise (values in memory or produced lazily).

    Attributes:
        name: a short name, shown in the card (e.g. ``shapes`` or the manifest's file name).
        ids: one unique string id per row.
        modalities: ``{modality: values}``, each as long as ``ids``: a list, or a
            :class:`~mmsafe.data.columns.LazyColumn` that decodes on access.
        labels: ``int64`` class index per row, ``-1`` where unlabelled.
        classes: class names; ``labels`` index into it.
        groups: an optional group attribute per row (for fairness and slices).
        splits: an optional split name per row (``train`` / ``calibration`` / ``test``).
        meta: one dict per row with anything else (planted-flaw ground truth lives here); a
            list or a lazy column of dicts.
        skipped: rows that were dropped on load, with the reason.
        source: where the data came from (a manifest path or a world spec string).
        catalog: for recommendation data, the items that ``classes`` name, one row per class
            in the same order (their ``image`` / ``text`` columns, item attributes in
            ``meta``). Rows are then users: a ``sequence`` column of item positions (their
            history, oldest first) and, as the label, the held-out next item.

    Example:
        >>> import numpy as np
        >>> ds = Dataset(name="toy", ids=["a", "b"], modalities={"text": ["x", "y"]},
        ...              labels=np.array([0, 1]), classes=["no", "yes"])
        >>> len(ds), ds.subset([1]).ids
        (2, ['b'])
    """

    name: str
    ids: list[str]
    modalities: dict[str, Sequence[Any]]
    labels: np.ndarray
    classes: list[str]
    groups: list[str] | None = None
    splits: list[str] | None = None
    meta: Sequence[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    source: str = ""
    catalog: Dataset | None = None
    _digests: dict[str, tuple[Sequence[Any], int, bytes]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # (parent, int64 row positions, {modality: (parent's list, subset's list)}) from subset():
    # a column whose two lists are unchanged is digested from the parent's memoised digest
    # and the positions, not from its values.
    _origin: tuple[Dataset, bytes, dict[str, tuple[Sequence[Any], Sequence[Any]]]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.meta:
            self.meta = [{} for _ in range(n)]
        lengths = {"labels": len(self.labels), "meta": len(self.meta)}
        lengths |= {f"modality {k!r}": len(v) for k, v in self.modalities.items()}
        if self.groups is not None:
            lengths["groups"] = len(self.groups)
        if self.splits is not None:
            lengths["splits"] = len(self.splits)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"Dataset {self.name!r}: {n} ids but lengths {bad}")
        if self.catalog is not None and len(self.catalog) != len(self.classes):
            raise ValueError(
                f"Dataset {self.name!r}: {len(self.classes)} classes but a catalog of "
                f"{len(self.catalog)} items (one item per class)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modality_names(self) -> tuple[str, ...]:
        """The modalities present, in column order."""
        return tuple(self.modalities)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of rows that carry a label."""
        return self.labels >= 0

    def subset(self, index: Sequence[int] | np.ndarray, name: str | None = None) -> Dataset:
        """Rows at ``index`` (integer positions or a boolean mask), as a new Dataset."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        pick = [int(i) for i in idx]
        out = Dataset(
            name=name or self.name,
            ids=[self.ids[i] for i in pick],
            modalities={k: _take(v, idx, pick) for k, v in self.modalities.items()},
            labels=self.labels[idx],
            classes=list(self.classes),
            groups=None if self.groups is None else [self.groups[i] for i in pick],
            splits=None if self.splits is None else [self.splits[i] for i in pick],
            meta=_take(self.meta, idx, pick),
            skipped=list(self.skipped),
            source=self.source,
            catalog=self.catalog,
        )
        built = {k: (self.modalities[k], v) for k, v in out.modalities.items()}
        out._origin = (self, idx.tobytes(), built)
        return out

    def split(self, name: str) -> Dataset:
        """Rows whose split is ``name``; raises ``KeyError`` when there are none."""
        if self.splits is None:
            raise KeyError(f"{self.name!r} has no split column")
        mask = np.array([s == name for s in self.splits], dtype=bool)
        if not mask.any():
            raise KeyError(f"{self.name!r} has no rows in split {name!r}")
        return self.subset(mask, name=f"{self.name}[{name}]")

    def has_split(self, name: str) -> bool:
        """Whether any row belongs to split ``name``."""
        return self.splits is not None and name in set(self.splits)

    def fingerprint(self) -> str:
        """A content hash of ids, modality values, labels, classes, groups and splits.

        Two datasets with the same fingerprint give the same model outputs, so the engine keys
        its cache on it. The digest of each modality column is memoised per list object: treat
        modality values as immutable (build a new list to change them); labels, groups, splits
        and ids are hashed afresh on every call.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((self.classes, self.modality_names)).encode())
        h.update("\x1f".join(self.ids).encode())
        h.update(self.labels.tobytes())
        h.update(repr((self.groups, self.splits)).encode())
        for name, values in self.modalities.items():
            h.update(name.encode())
            h.update(self._values_digest(name, values))
        if self.catalog is not None:
            h.update(b"catalog\x1f" + self.catalog.fingerprint().encode())
        return h.hexdigest()[:16]

    def _values_digest(self, name: str, values: Sequence[Any]) -> bytes:
        memo = self._digests.get(name)
        if memo is not None and memo[0] is values and memo[1] == len(values):
            return memo[2]
        if is_lazy(values):  # identified by its source, never decoded for a fingerprint
            digest = values.digest()  # type: ignore[attr-defined]
            self._digests[name] = (values, len(values), digest)
            return digest
        h = hashlib.blake2b(digest_size=16)
        parent, rows, built = self._origin or (None, b"", {})
        source, column = built.get(name, (None, None))
        if (
            parent is not None
            and column is values
            and len(values) * 8 == len(rows)
            and parent.modalities.get(name) is source
        ):
            # A subset's column, both lists unchanged: the parent's (memoised) digest and the
            # row positions fix it, so re-splitting the same data never re-hashes its images.
            h.update(b"subset\x1f" + parent._values_digest(name, source) + rows)
        elif all(isinstance(v, np.ndarray) for v in values):  # one update, no per-row hashing
            h.update(repr([(v.shape, v.dtype.str) for v in values]).encode())
            if values:
                h.update(np.concatenate([v.reshape(-1).view(np.uint8) for v in values]))
        else:
            h.update("\x1e".join(map(str, values)).encode())
        self._digests[name] = (values, len(values), h.digest())
        return h.digest()


def _take(values: Sequence[Any], idx: np.ndarray, pick: list[int]) -> Sequence[Any]:
    """Rows ``idx`` of a column: a view of a lazy column, a new list otherwise."""
    if is_lazy(values):
        return values.take(idx)  # type: ignore[attr-defined]
    return [values[i] for i in pick]
