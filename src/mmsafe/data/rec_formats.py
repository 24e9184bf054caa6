r"""Load real sequential-recommendation data (IISAN TSV folders, MMRec atomic files).

Both loaders return the recommendation form of :class:`~mmsafe.data.dataset.Dataset`: one row
per **user**, a ``sequence`` column holding the user's interactions oldest first as item
positions (indices into ``classes`` and rows of ``catalog``) without the held-out last item, the
held-out last item as the label (leave-one-out), the item ids as ``classes`` and the items as
``catalog`` (``image`` / ``text`` columns, or precomputed ``image_features`` /
``text_features``). Users with fewer than :data:`MIN_INTERACTIONS` interactions are dropped and
recorded in ``Dataset.skipped``.

* ``iisan:<folder>`` (IISAN, SIGIR'24, github.com/GAIR-Lab/IISAN): ``users.tsv`` (or the one
  ``*users*.tsv``) with ``user<TAB>item item item ...`` per line, oldest first; ``items.tsv``
  (or the one ``*items*.tsv``) with ``item<TAB>title`` per line; images, optional, in
  ``images/`` (or the one folder whose name contains ``image``) as ``<item id>.jpg`` / ``.png``.
* ``mmrec:<folder>`` (MMRec, github.com/enoche/MMRec, RecBole atomic files): one ``<name>.inter``
  with a tab-separated header naming a user, an item and (optionally) a timestamp column
  (``userID``/``user_id``, ``itemID``/``item_id``, ``timestamp``; RecBole ``:token`` /
  ``:float`` type suffixes allowed), ordered per user by timestamp; and at least one of
  ``image_feat.npy`` / ``text_feat.npy`` (row ``i`` = item id ``i``), titles (``<name>.item``
  with a header naming an item and a ``title`` column, or ``titles.tsv`` with ``item<TAB>title``),
  and images in ``images/<item id>.*``.

Bad input raises :class:`~mmsafe.data.manifest.ManifestError` (the CLI's exit 2) naming the
file, the 1-based line, the field and what to do. See ``docs/data.md``.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = Path(tmp)
    ...     _ = (folder / "items.tsv").write_text("i1\tred mug\ni2\tblue cup\ni3\ttea\n")
    ...     _ = (folder / "users.tsv").write_text("u1\ti1 i2 i3 i1\nu2\ti3 i3\n")
    ...     ds = load_iisan(folder)
    >>> ds.ids, ds.modalities["sequence"][0].tolist(), ds.labels.tolist(), ds.classes
    (['u1'], [0, 1, 2], [0], ['i1', 'i2', 'i3'])
    >>> ds.catalog.modalities["text"], [s.reason for s in ds.skipped]
    (['red mug', 'blue cup', 'tea'], ['2 interactions: a user needs at least 3 (a history of 2 and a held-out item)'])
"""  # noqa: E501

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsafe.data.dataset import UNLABELLED, Dataset, SkippedRow

# The manifest's image validation, reused so a bad image reads the same everywhere.
from mmsafe.data.manifest import (
    MAX_LISTED_PROBLEMS,
    InvalidValue,
    ManifestError,
    Problem,
    _image_column,
    _load_image,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MIN_INTERACTIONS",
    "REC_FORMATS",
    "is_rec_spec",
    "load_iisan",
    "load_mmrec",
    "load_rec_data",
]

MIN_INTERACTIONS = 3
"""Fewest interactions a user needs: a history of at least 2 and a held-out item."""

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
"""Image file suffixes looked for (any case), in order of preference for one item id."""

_USER_COLUMNS = ("userid", "user_id", "user")
_ITEM_COLUMNS = ("itemid", "item_id", "item")
_TIME_COLUMNS = ("timestamp",)
_TITLE_COLUMNS = ("title", "name", "text")
_FEATURES = {"image_features": "image_feat.npy", "text_features": "text_feat.npy"}
_LINE_HINT = (
    "Fix these lines, or pass --skip-invalid (skip_invalid=True in Python) to drop them (the "
    "card will record them)."
)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _describe(p: Problem, unit: str, id_label: str) -> str:
    where = f"item #{p.row}" if unit == "item" else f"{unit} {p.row}"
    if p.id is not None:
        where += f" ({id_label} {p.id!r})"
    return f"{where}, field {p.field!r}: {p.reason}"


def _error(
    path: Path,
    problems: Sequence[Problem],
    *,
    unit: str = "line",
    id_label: str = "user",
    hint: str = _LINE_HINT,
) -> ManifestError:
    """A ManifestError listing ``problems`` as ``<unit> N (<id_label> 'x'), field 'f': ...``."""
    n = len({p.row for p in problems})
    head = f"{n} invalid {unit}{'' if n == 1 else 's'} in {path}"
    if len(problems) != n:
        head += f" ({len(problems)} problems)"
    lines = [head + ":"]
    lines += [f"  {_describe(p, unit, id_label)}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    lines.append(hint)
    return ManifestError(path, problems, message="\n".join(lines))


def _fields(n: int) -> str:
    return f"{n} tab-separated field{'' if n == 1 else 's'}"


def _fail(path: Path, message: str) -> ManifestError:
    return ManifestError(path, message=message)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _check_folder(folder: str | Path, fmt: str) -> Path:
    path = Path(folder)
    if not path.exists():
        raise _fail(path, f"{fmt} data folder not found: {path} (cwd {Path.cwd()})")
    if not path.is_dir():
        raise _fail(path, f"{fmt} data must be a folder, got the file {path}: pass its folder")
    return path


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """``(1-based line number, text)`` of each non-blank line (BOM and carriage returns dropped)."""
    try:
        text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except OSError as exc:
        raise _fail(path, f"cannot read {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise _fail(path, f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    lines = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), start=1)]
    out = [(i, line) for i, line in lines if line.strip()]
    if not out:
        raise _fail(path, f"{path}: empty file (no lines)")
    return out


def _find_one(folder: Path, exact: str, pattern: str, what: str, required: bool) -> Path | None:
    """``folder/exact`` if present, else the one file matching ``pattern``."""
    if (folder / exact).is_file():
        return folder / exact
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise _fail(
            folder,
            f"{folder}: several {what} files ({names}); rename the one to use to {exact}",
        )
    if required:
        raise _fail(folder, f"{folder}: no {what} file (expected {exact} or {pattern})")
    return None


def _image_folder(folder: Path) -> Path | None:
    """``folder/images``, else the one sub-folder whose name contains ``image`` (not LMDB)."""
    if (folder / "images").is_dir():
        return folder / "images"
    found = sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and "image" in p.name.lower() and not p.name.lower().endswith(".lmdb")
    )
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise _fail(folder, f"{folder}: several image folders ({names}); rename one to images")
    if any(p.name.lower().endswith(".lmdb") for p in folder.iterdir()):
        warnings.warn(
            f"{folder}: LMDB image stores are not read; export the images to "
            f"{folder / 'images'}/<item id>.jpg to audit the image modality",
            stacklevel=3,
        )
    return None


def _unquote(text: str) -> str:
    """A title as pandas wrote it: surrounding quotes removed, doubled quotes undoubled.

    Example:
        >>> _unquote('"Zildjian 20"" Ride"'), _unquote("plain")
        ('Zildjian 20" Ride', 'plain')
    """
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def _column_name(cell: str) -> str:
    """A header cell without its RecBole type suffix, lower-cased (``userID:token``: ``userid``)."""
    return cell.split(":", 1)[0].strip().lower()


def _pick_column(names: list[str], wanted: tuple[str, ...]) -> int | None:
    for w in wanted:
        if w in names:
            return names.index(w)
    return None


@dataclass
class _Titles:
    """Titles by item id, each with its line, and the file's other columns per item."""

    path: Path
    titles: dict[str, tuple[int, str]] = field(default_factory=dict)
    extra: dict[str, dict[str, str]] = field(default_factory=dict)


def _read_titles(path: Path, header: bool | None) -> _Titles:
    """An ``item<TAB>title`` file; ``header``: required (True), detected (None), or none.

    Raises:
        ManifestError: a missing column, a malformed line, an empty id or title, a repeated id.
    """
    lines = _read_lines(path)
    item_col, title_col, names = 0, 1, ["item", "title"]
    first = [_column_name(c) for c in lines[0][1].split("\t")]
    found_item, found_title = (
        _pick_column(first, _ITEM_COLUMNS),
        _pick_column(first, _TITLE_COLUMNS),
    )
    looks_like_header = found_item == 0 and found_title is not None
    if header or (header is None and looks_like_header):
        for col, want, label in (
            (found_item, _ITEM_COLUMNS, "item"),
            (found_title, _TITLE_COLUMNS, "title"),
        ):
            if col is None:
                reason = (
                    f"missing the {label} column (one of {', '.join(want)}; "
                    f"found {', '.join(first)})"
                )
                hint = "Name the columns in the header line."
                raise _error(
                    path, [Problem(lines[0][0], label, reason)], id_label="item", hint=hint
                )
        assert found_item is not None and found_title is not None
        item_col, title_col, names = found_item, found_title, first
        lines = lines[1:]
    out = _Titles(path)
    problems: list[Problem] = []
    width = len(names)
    for number, line in lines:
        cells = line.split("\t")
        ident = cells[item_col].strip() if len(cells) > item_col else ""
        if len(cells) != width:
            reason = f"malformed line: {_fields(len(cells))}, expected {width} ({', '.join(names)})"
            problems.append(Problem(number, "(row)", reason, ident if len(cells) > 1 else None))
            continue
        title = _unquote(cells[title_col])
        if not ident:
            problems.append(Problem(number, names[item_col], "empty item id"))
        elif ident in out.titles:
            first_line = out.titles[ident][0]
            reason = f"duplicate item id {ident!r} (first on line {first_line})"
            problems.append(Problem(number, names[item_col], reason, ident))
        elif not title:
            problems.append(Problem(number, names[title_col], "empty title", ident))
        else:
            out.titles[ident] = (number, title)
            others = {
                n: c
                for j, (n, c) in enumerate(zip(names, cells, strict=True))
                if j not in (item_col, title_col) and c.strip()
            }
            if others:
                out.extra[ident] = others
    if problems:
        raise _error(path, problems, id_label="item", hint="Fix these lines of the item file.")
    if not out.titles:
        raise _fail(path, f"{path}: no items (only a header line)")
    return out


def _find_images(image_dir: Path, ids: Sequence[str]) -> tuple[list[Any], list[Problem]]:
    """Validate ``image_dir/<id>.<suffix>`` of every item (threads, as manifests do)."""
    by_stem: dict[str, str] = {}
    rank = {s: i for i, s in enumerate(IMAGE_SUFFIXES)}
    with os.scandir(image_dir) as entries:
        files = sorted(
            (e.name for e in entries if Path(e.name).suffix.lower() in rank),
            key=lambda n: rank[Path(n).suffix.lower()],
        )
    for name in files:
        by_stem.setdefault(Path(name).stem, name)

    def check(pos_id: tuple[int, str]) -> tuple[Any, Problem | None]:
        pos, ident = pos_id
        name = by_stem.get(ident)
        if name is None:
            suffixes = "|".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
            reason = f"no image file {image_dir.name}/{ident}.({suffixes})"
            return None, Problem(pos + 1, "image", reason, ident)
        try:
            return _load_image(name, image_dir), None
        except InvalidValue as exc:
            return None, Problem(pos + 1, "image", str(exc), ident)

    workers = min(8, os.cpu_count() or 1)
    jobs = list(enumerate(ids))
    if len(jobs) < 32 or workers == 1:
        results = [check(j) for j in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, jobs))
    cells = [r for r, _ in results]
    return cells, [p for _, p in results if p is not None]


def _read_features(path: Path) -> np.ndarray:
    """A 2-D finite float array from an ``.npy`` file, one row per item."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise _fail(path, f"{path}: not a readable .npy array ({exc})") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or arr.shape[0] == 0:
        raise _fail(
            path,
            f"{path}: features must be a non-empty 2-D numeric array (items x dims), got "
            f"{arr.dtype} {arr.shape}",
        )
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if len(bad):
        rows = ", ".join(str(int(r)) for r in bad[:5])
        raise _fail(path, f"{path}: NaN or infinite values in rows {rows} (item ids)")
    return arr.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Building the dataset
# --------------------------------------------------------------------------------------------


@dataclass
class _User:
    """One user's interactions in order, with the file line that introduced the user."""

    id: str
    line: int
    items: list[int] = field(default_factory=list)
    times: list[float] | None = None


def _build(
    name: str,
    source: str,
    users: list[_User],
    catalog: Dataset,
    skipped: list[SkippedRow],
    users_path: Path,
) -> Dataset:
    kept: list[_User] = []
    for u in users:
        if len(u.items) < MIN_INTERACTIONS:
            reason = (
                f"{len(u.items)} interaction{'' if len(u.items) == 1 else 's'}: a user needs at "
                f"least {MIN_INTERACTIONS} (a history of 2 and a held-out item)"
            )
            skipped.append(SkippedRow(u.line, "items", reason, u.id))
        else:
            kept.append(u)
    if not kept:
        raise _fail(
            users_path,
            f"{users_path}: no user has {MIN_INTERACTIONS} or more interactions, so there is "
            "nothing to hold out and audit",
        )
    meta = [{} if u.times is None else {"timestamps": list(u.times)} for u in kept]
    return Dataset(
        name=name,
        ids=[u.id for u in kept],
        modalities={"sequence": [np.asarray(u.items[:-1], dtype=np.int64) for u in kept]},
        labels=np.array([u.items[-1] for u in kept], dtype=np.int64),
        classes=list(catalog.ids),
        groups=None,
        meta=meta,
        skipped=sorted(skipped, key=lambda s: s.row),
        source=source,
        catalog=catalog,
    )


def _catalog(
    name: str,
    source: str,
    ids: list[str],
    modalities: dict[str, Sequence[Any]],
    meta: list[dict[str, Any]] | None = None,
) -> Dataset:
    return Dataset(
        name=f"{name}-items",
        ids=ids,
        modalities=modalities,
        labels=np.full(len(ids), UNLABELLED, dtype=np.int64),
        classes=[],
        meta=meta or [],
        source=source,
    )


def _image_modality(folder: Path, ids: list[str], catalog_file: Path) -> dict[str, Any]:
    image_dir = _image_folder(folder)
    if image_dir is None:
        return {}
    cells, problems = _find_images(image_dir, ids)
    if problems:
        hint = (
            f"Fix these items: each item of {catalog_file.name} needs a readable image "
            f"{image_dir.name}/<item id>.jpg (or .png, ...)."
        )
        raise _error(image_dir, problems, unit="item", id_label="id", hint=hint)
    return {"image": _image_column(cells)}


# --------------------------------------------------------------------------------------------
# IISAN
# --------------------------------------------------------------------------------------------


def load_iisan(folder: str | Path, *, skip_invalid: bool = False) -> Dataset:
    """Load an IISAN-style folder of TSV files.

    Files (``<folder>/``): ``users.tsv`` (else the one ``*users*.tsv``), one user per line,
    ``user<TAB>item item item ...`` oldest first; ``items.tsv`` (else the one ``*items*.tsv``),
    ``item<TAB>title`` per line (the catalog, in file order); optional images
    ``images/<item id>.jpg`` (else in the one sub-folder whose name contains ``image``). A first
    line naming the columns (``item``/``item_id``..., ``title``) is skipped.

    Args:
        folder: the folder.
        skip_invalid: drop user lines with problems (recorded in ``Dataset.skipped``) instead of
            raising; problems in the item file or the images always raise.

    Returns:
        Users as rows (``sequence``, held-out label), items as ``catalog`` (``text`` titles and,
        when present, ``image``); ``source`` is ``iisan:<absolute folder>``.

    Raises:
        ManifestError: a missing folder or file, an empty file, a malformed line, an unknown or
            repeated id, an empty title, a missing or unreadable image.
    """
    folder = _check_folder(folder, "IISAN")
    users_path = _find_one(folder, "users.tsv", "*users*.tsv", "user sequence", required=True)
    items_path = _find_one(folder, "items.tsv", "*items*.tsv", "item", required=True)
    assert users_path is not None and items_path is not None
    titles = _read_titles(items_path, header=None)
    ids = list(titles.titles)
    index = {item: i for i, item in enumerate(ids)}
    modalities: dict[str, Sequence[Any]] = {"text": [titles.titles[i][1] for i in ids]}
    modalities |= _image_modality(folder, ids, items_path)
    source = f"iisan:{folder.resolve()}"
    catalog = _catalog(folder.resolve().name, source, ids, modalities)

    lines = _read_lines(users_path)
    first = [_column_name(c) for c in lines[0][1].split("\t")]
    if _pick_column(first, _USER_COLUMNS) == 0:
        lines = lines[1:]  # a header line
    users: list[_User] = []
    seen: dict[str, int] = {}
    problems: list[Problem] = []
    for number, line in lines:
        cells = line.split("\t")
        ident = cells[0].strip()
        line_problems = []
        if len(cells) != 2:
            reason = (
                f"malformed line: {_fields(len(cells))}, expected 2 "
                "(user id, space-separated item ids)"
            )
            shown_id = ident if len(cells) > 1 and ident else None  # one field: no id to trust
            line_problems.append(Problem(number, "(row)", reason, shown_id))
        elif not ident:
            line_problems.append(Problem(number, "user", "empty user id"))
        elif ident in seen:
            reason = f"duplicate user id {ident!r} (first on line {seen[ident]})"
            line_problems.append(Problem(number, "user", reason, ident))
        else:
            tokens = cells[1].split()
            unknown = list(dict.fromkeys(t for t in tokens if t not in index))
            if not tokens:
                line_problems.append(Problem(number, "items", "no item ids", ident))
            elif unknown:
                shown = ", ".join(repr(t) for t in unknown[:3])
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                reason = f"unknown item id {shown}{more} (not in {items_path.name})"
                line_problems.append(Problem(number, "items", reason, ident))
            else:
                seen[ident] = number
                users.append(_User(ident, number, [index[t] for t in tokens]))
        problems += line_problems
    if problems and not skip_invalid:
        raise _error(users_path, problems)
    if not users and not problems:
        raise _fail(users_path, f"{users_path}: no users (only a header line)")
    return _build(folder.resolve().name, source, users, catalog, _skipped(problems), users_path)


def _skipped(problems: Sequence[Problem]) -> list[SkippedRow]:
    by_row: dict[int, list[Problem]] = {}
    for p in problems:
        by_row.setdefault(p.row, []).append(p)
    out = []
    for row, probs in sorted(by_row.items()):
        ident = next((p.id for p in probs if p.id is not None), None)
        fields = ", ".join(dict.fromkeys(p.field for p in probs))
        out.append(SkippedRow(row, fields, "; ".join(p.reason for p in probs), ident))
    return out


# --------------------------------------------------------------------------------------------
# MMRec
# --------------------------------------------------------------------------------------------


def _sort_key(ident: str) -> tuple[int, int, str]:
    return (0, int(ident), "") if ident.isdigit() else (1, 0, ident)


def _mmrec_catalog(folder: Path, stem: str, source: str) -> Dataset:
    """Items from the features (ids ``0..N-1``), else the titles, else the image files."""
    features = {}
    for column, file in _FEATURES.items():
        if (folder / file).is_file():
            features[column] = (folder / file, _read_features(folder / file))
    rows = {c: a.shape[0] for c, (_, a) in features.items()}
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{p.name}: {a.shape[0]} rows" for p, a in features.values())
        raise _fail(
            folder,
            f"{folder}: the feature files disagree on the number of items "
            f"({shown}); row i of each must be item id i",
        )

    titles: _Titles | None = None
    if (folder / f"{stem}.item").is_file():
        titles = _read_titles(folder / f"{stem}.item", header=True)
    else:
        path = _find_one(folder, "titles.tsv", "*titles*.tsv", "titles", required=False)
        if path is not None:
            titles = _read_titles(path, header=None)
    image_dir = _image_folder(folder)

    if features:
        ids = [str(i) for i in range(next(iter(rows.values())))]
        origin = next(iter(features.values()))[0]
    elif titles is not None:
        ids, origin = list(titles.titles), titles.path
    elif image_dir is not None:
        stems = {
            Path(p).stem for p in os.listdir(image_dir) if Path(p).suffix.lower() in IMAGE_SUFFIXES
        }
        ids, origin = sorted(stems, key=_sort_key), image_dir
        if not ids:
            raise _fail(image_dir, f"{image_dir}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    else:
        raise _fail(
            folder,
            f"{folder}: no item modality found; add at least one of image_feat.npy, "
            f"text_feat.npy, {stem}.item (or titles.tsv) with titles, or an images/ folder "
            "with <item id>.jpg files",
        )

    modalities: dict[str, Sequence[Any]] = {}
    meta: list[dict[str, Any]] = [{} for _ in ids]
    if titles is not None:
        missing = [
            Problem(pos + 1, "title", f"no title in {titles.path.name}", ident)
            for pos, ident in enumerate(ids)
            if ident not in titles.titles
        ]
        if missing:
            hint = f"Every item of {origin.name} needs a title (or remove {titles.path.name})."
            raise _error(titles.path, missing, unit="item", id_label="id", hint=hint)
        modalities["text"] = [titles.titles[i][1] for i in ids]
        meta = [dict(titles.extra.get(i, {})) for i in ids]
    if image_dir is not None:
        modalities |= _image_modality(folder, ids, origin)
    for column, (_, arr) in features.items():
        modalities[column] = list(arr)
    return _catalog(folder.resolve().name, source, ids, modalities, meta)


def load_mmrec(folder: str | Path, *, skip_invalid: bool = False) -> Dataset:
    """Load an MMRec (RecBole atomic file) folder.

    Files (``<folder>/``): exactly one ``<name>.inter``: tab-separated, a header line naming a
    user column (``userID`` / ``user_id``), an item column (``itemID`` / ``item_id``) and
    optionally ``timestamp`` (RecBole type suffixes such as ``:token`` are ignored; other
    columns, e.g. ``rating`` or ``x_label``, are ignored too). Each user's interactions are
    ordered by timestamp (ties and files without one keep the file order); the last is held out.
    Item modalities, at least one: ``image_feat.npy`` / ``text_feat.npy`` (row ``i`` is item id
    ``i``, as MMRec writes them), titles (``<name>.item`` with a header naming an item and a
    ``title`` column, else ``titles.tsv`` with ``item<TAB>title``), images
    ``images/<item id>.jpg``. The catalog is the features' items (ids ``0..N-1``), else the
    title file's, else the image files' (sorted by id).

    Args:
        folder: the folder.
        skip_invalid: drop interaction lines with problems (recorded in ``Dataset.skipped``)
            instead of raising; problems with the item files or images always raise.

    Returns:
        Users as rows (``sequence``, held-out label, ``meta["timestamps"]`` when the file has
        them: the sequence's then the label's), items as ``catalog`` (``image``, ``text``,
        ``image_features`` / ``text_features``); ``source`` is ``mmrec:<absolute folder>``.

    Raises:
        ManifestError: a missing folder, ``.inter`` file or column, an empty file, a malformed
            line, a non-numeric timestamp, an unknown item id, bad features, a missing title or
            image.
    """
    folder = _check_folder(folder, "MMRec")
    inter = sorted(p for p in folder.glob("*.inter") if p.is_file())
    if not inter:
        raise _fail(folder, f"{folder}: no .inter file (MMRec interactions, e.g. baby.inter)")
    if len(inter) > 1:
        names = ", ".join(p.name for p in inter)
        raise _fail(folder, f"{folder}: several .inter files ({names}); keep one per folder")
    path = inter[0]
    source = f"mmrec:{folder.resolve()}"
    catalog = _mmrec_catalog(folder, path.stem, source)
    index = {item: i for i, item in enumerate(catalog.ids)}

    lines = _read_lines(path)
    header_line, header = lines[0][0], lines[0][1].split("\t")
    names = [_column_name(c) for c in header]
    cols = {
        "user": _pick_column(names, _USER_COLUMNS),
        "item": _pick_column(names, _ITEM_COLUMNS),
        "timestamp": _pick_column(names, _TIME_COLUMNS),
    }
    for label in ("user", "item"):
        if cols[label] is None:
            reason = (
                f"missing the {label} column (one of userID, user_id / itemID, item_id; found "
                f"{', '.join(c.strip() for c in header)})"
            )
            raise _error(
                path,
                [Problem(header_line, label, reason)],
                hint="The first line of a .inter file names its columns.",
            )
    user_col, item_col, time_col = cols["user"], cols["item"], cols["timestamp"]
    assert user_col is not None and item_col is not None
    if len(lines) == 1:
        raise _fail(path, f"{path}: no interactions (only the header line)")
    shown = [c.strip() for c in header]
    origin = "the features" if catalog.modalities.keys() & set(_FEATURES) else "the catalog"

    users: dict[str, _User] = {}
    stamps: dict[str, list[tuple[float, int, int]]] = {}
    problems: list[Problem] = []
    for number, line in lines[1:]:
        cells = line.split("\t")
        if len(cells) != len(header):
            ident = cells[user_col].strip() if len(cells) > max(user_col, 1) else None
            reason = f"malformed line: {_fields(len(cells))} but the header has "
            reason += f"{len(header)} ({', '.join(shown)})"
            problems.append(Problem(number, "(row)", reason, ident or None))
            continue
        user, item = cells[user_col].strip(), cells[item_col].strip()
        line_problems = []
        if not user:
            line_problems.append(Problem(number, shown[user_col], "empty user id"))
        if not item:
            line_problems.append(Problem(number, shown[item_col], "empty item id", user or None))
        elif item not in index:
            reason = f"unknown item id {item!r} (not among the {len(index)} items of {origin})"
            line_problems.append(Problem(number, shown[item_col], reason, user or None))
        t = 0.0
        if time_col is not None:
            try:
                t = float(cells[time_col])
                if not math.isfinite(t):
                    raise ValueError
            except ValueError:
                reason = f"timestamp must be a finite number, got {cells[time_col].strip()!r}"
                line_problems.append(Problem(number, shown[time_col], reason, user or None))
        if line_problems:
            problems += line_problems
            continue
        if user not in users:
            users[user] = _User(user, number, times=[] if time_col is not None else None)
            stamps[user] = []
        stamps[user].append((t, number, index[item]))
    if problems and not skip_invalid:
        raise _error(path, problems)
    for user, rows in stamps.items():
        rows.sort()  # by timestamp, then file line
        users[user].items = [i for _, _, i in rows]
        if users[user].times is not None:
            users[user].times = [t for t, _, _ in rows]
    return _build(
        folder.resolve().name, source, list(users.values()), catalog, _skipped(problems), path
    )


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


REC_FORMATS: dict[str, Callable[..., Dataset]] = {"iisan": load_iisan, "mmrec": load_mmrec}
"""Format prefix of ``--data <format>:<folder>`` -> loader ``(folder, *, skip_invalid)``."""


def is_rec_spec(spec: str) -> bool:
    """Whether ``spec`` is ``<format>:<folder>`` for a known recommendation data format.

    Example:
        >>> is_rec_spec("iisan:data/Instrument"), is_rec_spec("shapes-rec"), is_rec_spec("x.csv")
        (True, False, False)
    """
    if not isinstance(spec, str):
        return False
    prefix, colon, _ = spec.strip().partition(":")
    return bool(colon) and prefix.strip().lower() in REC_FORMATS


def load_rec_data(spec: str, *, skip_invalid: bool = False) -> Dataset:
    """Load ``iisan:<folder>`` or ``mmrec:<folder>``.

    Raises:
        ManifestError: see :func:`load_iisan` and :func:`load_mmrec`; also an empty folder.
    """
    prefix, _, rest = spec.strip().partition(":")
    fmt = prefix.strip().lower()
    if fmt not in REC_FORMATS:
        raise ValueError(f"not a recommendation data spec: {spec!r}")
    if not rest.strip():
        raise _fail(Path("."), f"--data {spec!r} names no folder: write {fmt}:<folder>")
    return REC_FORMATS[fmt](Path(rest.strip()).expanduser(), skip_invalid=skip_invalid)
