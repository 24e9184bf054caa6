r"""Load a user's JSONL/CSV manifest into a :class:`~mmsafe.data.dataset.Dataset`, validating it.

A manifest lists one row per item: ``{id, <modality>..., label?, group?, split?, meta?}``. The
modalities are named columns: every column whose name is a key of :data:`MODALITY_LOADERS`
(``image``, ``text``) holds that modality, so adding a modality adds an entry there, not a code
path. ``image`` cells are paths relative to the manifest's folder (absolute paths work too).

Validation runs before any model work and reports every bad row at once, in a
:class:`ManifestError`. Row numbers follow one convention everywhere:

* JSONL: row ``N`` is line ``N`` of the file (blank lines are skipped but still counted).
* CSV: the header is row 0 and row ``N`` starts on line ``N + 1`` of the file.

See ``docs/data.md`` for the user-facing description.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = Path(tmp) / "eval.jsonl"
    ...     _ = path.write_text('{"id": "a", "text": "a red circle", "label": "circle"}\n'
    ...                         '{"id": "b", "text": "a blue square", "label": "square"}\n')
    ...     ds = load_manifest(path)
    >>> ds.ids, ds.classes, ds.labels.tolist(), ds.modality_names
    (['a', 'b'], ['circle', 'square'], [0, 1], ('text',))
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmsafe.data.columns import ImageFiles, decode_image, file_digest
from mmsafe.data.dataset import UNLABELLED, Dataset, SkippedRow
from mmsafe.engine.cache import atomic_write, atomic_write_text

__all__ = [
    "MAX_LISTED_PROBLEMS",
    "MODALITY_LOADERS",
    "MODALITY_WRITERS",
    "ROW_FIELD",
    "InvalidValue",
    "ManifestError",
    "Problem",
    "load_manifest",
    "read_classes_file",
    "write_manifest",
]

ROW_FIELD = "(row)"
"""The ``field`` of a problem that concerns a whole row (a malformed JSON line, say)."""

MAX_LISTED_PROBLEMS = 50
"""How many problems a :class:`ManifestError` message lists before ``... and K more``."""

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_RESERVED = ("id", "label", "group", "split", "meta")
_INT_RE = re.compile(r"[+-]?\d+")
_JSON_TYPE = {
    type(None): "null",
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "list",
    dict: "object",
}


# --------------------------------------------------------------------------------------------
# Problems and the error that carries them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one row of a manifest.

    Attributes:
        row: the row number (JSONL: the line number; CSV: the header is row 0, row ``N`` starts
            on line ``N + 1``).
        field: the offending column, or :data:`ROW_FIELD` when the whole row is unusable.
        reason: what is wrong, in words a user can act on.
        id: the row's id where it could be read.

    Example:
        >>> Problem(7, "image", "file not found: x.png", "x").describe()
        "row 7 (id 'x'), field 'image': file not found: x.png"
        >>> Problem(3, ROW_FIELD, "malformed JSON line: Expecting value (column 1)").describe()
        'row 3: malformed JSON line: Expecting value (column 1)'
    """

    row: int
    field: str
    reason: str
    id: str | None = None

    def describe(self) -> str:
        """The problem as one line of text."""
        where = f"row {self.row}"
        extra = ["header"] if self.row == 0 else []
        if self.id is not None:
            extra.append(f"id {self.id!r}")
        if extra:
            where += f" ({', '.join(extra)})"
        if self.field != ROW_FIELD:
            where += f", field {self.field!r}"
        return f"{where}: {self.reason}"


class ManifestError(ValueError):
    """A manifest cannot be loaded; ``str(error)`` says what is wrong and what to do.

    Attributes:
        path: the manifest's path.
        problems: every invalid row found (empty when the file as a whole is unusable, e.g.
            missing or of an unknown type).

    Example:
        >>> err = ManifestError("m.jsonl", [Problem(2, "text", "empty text", "b")])
        >>> print(err)
        1 invalid row in m.jsonl:
          row 2 (id 'b'), field 'text': empty text
        Fix these rows, or pass --skip-invalid (skip_invalid=True in Python) to drop them \
(the card will record them).
    """

    def __init__(
        self,
        path: str | Path,
        problems: Iterable[Problem] = (),
        *,
        message: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.problems: list[Problem] = list(problems)
        if message is None:
            message = _format_problems(self.path, self.problems, hint)
        super().__init__(message)


def _format_problems(path: Path, problems: Sequence[Problem], hint: str | None) -> str:
    n_rows = len({p.row for p in problems})
    head = f"{n_rows} invalid row{'' if n_rows == 1 else 's'} in {path}"
    if len(problems) != n_rows:
        head += f" ({len(problems)} problems)"
    lines = [head + ":"]
    lines += [f"  {p.describe()}" for p in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    if _format_of(path) in ("csv", "tsv") and any(p.row > 0 for p in problems):
        lines.append("(Rows count from the header, row 0: row N starts on line N+1 of the file.)")
    if hint is None:
        hint = (
            "Fix these rows, or pass --skip-invalid (skip_invalid=True in Python) to drop them "
            "(the card will record them)."
        )
    lines.append(hint)
    return "\n".join(lines)


def _skipped_rows(problems: Sequence[Problem]) -> list[SkippedRow]:
    """One :class:`SkippedRow` per dropped row; several problems in a row are joined."""
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
# Modalities: one loader (cell -> value) and one writer (value -> cell) per modality name
# --------------------------------------------------------------------------------------------


class InvalidValue(ValueError):
    """Raised by a modality loader when a cell is unusable; the message is the reason shown."""


ModalityLoader = Callable[[Any, Path], Any]
"""``loader(cell, manifest_dir) -> value``; raises :class:`InvalidValue` with the reason."""

ModalityWriter = Callable[[Any, Path, str], Any]
"""``writer(value, manifest_dir, relative_stem) -> cell`` (a JSON value for the manifest)."""


def _json_type(value: Any) -> str:
    name = _JSON_TYPE.get(type(value), type(value).__name__)
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return name if value is None else f"{name} {shown}"


def _load_text(value: Any, manifest_dir: Path) -> str:
    """Validate a ``text`` cell: a non-blank string, kept exactly as written.

    Example:
        >>> _load_text("a red circle", Path("."))
        'a red circle'
        >>> _load_text(" ", Path("."))
        Traceback (most recent call last):
        ...
        mmsafe.data.manifest.InvalidValue: empty text
    """
    if not isinstance(value, str):
        raise InvalidValue(f"wrong type: text must be a string, got {_json_type(value)}")
    if not value.strip():
        raise InvalidValue("empty text")
    if "\x00" in value:
        raise InvalidValue(
            "the text holds a NUL byte: the file is binary or in another encoding (UTF-16?); "
            "save the manifest as UTF-8 text"
        )
    return value


def _load_image(value: Any, manifest_dir: Path) -> tuple[str, bytes]:
    """Validate an ``image`` cell (a path): the file exists and PIL decodes it whole.

    Relative paths resolve against ``manifest_dir``. Nothing decoded is kept: the row holds the
    absolute path and the file's digest, and the image is decoded again (EXIF orientation
    applied, alpha dropped: :func:`~mmsafe.data.columns.decode_image`) inside the engine's
    batches, so a manifest costs memory per row, not per pixel.
    """
    if not isinstance(value, str):
        raise InvalidValue(f"wrong type: image must be a path string, got {_json_type(value)}")
    text = value.strip()
    if not text:
        raise InvalidValue("empty image path")
    if text.startswith(("http://", "https://")):
        raise InvalidValue(f"URLs are not supported (mmsafe reads local files only): {text}")
    path = Path(text)
    full = path if path.is_absolute() else manifest_dir / path
    if full.is_symlink() and not full.exists():
        raise InvalidValue(
            f"broken or looping symbolic link: {text}; point it at an image file, or give the "
            "file's own path"
        )
    if not full.exists():
        where = "" if path.is_absolute() else f" (looked in {manifest_dir})"
        raise InvalidValue(f"file not found: {text}{where}")
    if not full.is_file():
        raise InvalidValue(f"not a file: {text}")
    try:
        decode_image(full)  # a whole decode: truncated files fail here, not mid-audit
        return str(full.resolve()), file_digest(full)
    except UnidentifiedImageError as exc:
        raise InvalidValue(f"unreadable image: {text} (not an image file PIL can read)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidValue(f"unreadable image: {text} ({exc})") from exc


def _image_column(cells: list[tuple[str, bytes]]) -> ImageFiles:
    digests = np.frombuffer(b"".join(d for _, d in cells), np.uint8).reshape(len(cells), 16)
    return ImageFiles([p for p, _ in cells], digests)


def _write_text(value: Any, manifest_dir: Path, stem: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"text values must be strings, got {type(value).__name__}")
    return value


def _write_image(value: Any, manifest_dir: Path, stem: str) -> str:
    arr = np.asarray(value)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images must be uint8 (H, W, 3) arrays, got {arr.dtype} {arr.shape}")
    rel = f"{stem}.png"
    target = manifest_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(arr))
    atomic_write(target, lambda p: image.save(p, format="PNG"))
    return rel


MODALITY_LOADERS: dict[str, ModalityLoader] = {"image": _load_image, "text": _load_text}
"""Modality name -> loader. A manifest column with one of these names holds that modality."""

MODALITY_COLUMNS: dict[str, Callable[[list[Any]], Sequence[Any]]] = {"image": _image_column}
"""Modality name -> how its validated cells become a column (a list when absent)."""

MODALITY_WRITERS: dict[str, ModalityWriter] = {"image": _write_image, "text": _write_text}
"""Modality name -> writer used by :func:`write_manifest`."""


# --------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------


@dataclass
class _RawRow:
    """A row as read from the file: column -> cell, before any validation."""

    row: int
    cells: dict[str, Any]
    problems: list[Problem] = field(default_factory=list)


@dataclass
class _Parsed:
    """A row after per-cell validation (labels are resolved later, once classes are known)."""

    row: int
    id: str | None
    values: dict[str, Any]
    label: str | int | None
    group: str | None
    split: str | None
    meta: dict[str, Any]
    problems: list[Problem]


def _format_of(path: Path) -> str | None:
    return _FORMATS.get(path.suffix.lower())


def _duplicate_key_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in a JSON object")
        out[key] = value
    return out


def _read_jsonl(path: Path) -> list[_RawRow]:
    """One :class:`_RawRow` per non-blank line; undecodable lines carry a row problem."""
    data = path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
            rows.append(_RawRow(number, {}, [Problem(number, ROW_FIELD, reason)]))
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_duplicate_key_hook)
        except json.JSONDecodeError as exc:
            reason = f"malformed JSON line: {exc.msg} (column {exc.colno})"
            rows.append(_RawRow(number, {}, [Problem(number, ROW_FIELD, reason)]))
            continue
        except ValueError as exc:  # the duplicate-key hook, or an integer of > 4300 digits
            rows.append(_RawRow(number, {}, [Problem(number, ROW_FIELD, f"malformed row: {exc}")]))
            continue
        except RecursionError:
            reason = "malformed row: JSON nested too deeply (flatten the row's values)"
            rows.append(_RawRow(number, {}, [Problem(number, ROW_FIELD, reason)]))
            continue
        if not isinstance(obj, dict):
            reason = f"malformed row: expected a JSON object per line, got {_json_type(obj)}"
            rows.append(_RawRow(number, {}, [Problem(number, ROW_FIELD, reason)]))
            continue
        rows.append(_RawRow(number, obj))
    return rows


def _iter_csv_records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(start line, fields)`` for each CSV record; fatal CSV errors become ManifestError."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        start = 1
        try:
            for record in reader:
                yield start, record
                start = reader.line_num + 1
        except csv.Error as exc:
            raise ManifestError(
                path,
                message=f"{path}: unreadable CSV at line {reader.line_num}: {exc}. Look there "
                f"for an unclosed quote or a cell over {csv.field_size_limit()} characters "
                "(keep long values in files the manifest points to).",
            ) from exc
        except UnicodeDecodeError as exc:
            raise ManifestError(
                path, message=f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8"
            ) from exc


def _read_csv(path: Path, delimiter: str) -> tuple[list[str], list[_RawRow]]:
    """The header and one :class:`_RawRow` per non-empty record (cells are strings)."""
    records = _iter_csv_records(path, delimiter)
    header: list[str] | None = None
    for _, fields in records:
        if any(cell.strip() for cell in fields):
            header = [cell.strip() for cell in fields]
            break
    if header is None:
        raise ManifestError(path, message=f"{path}: empty manifest (no header, no rows)")
    for i, name in enumerate(header, start=1):
        if not name:
            raise ManifestError(
                path,
                message=f"{path}: column {i} of the header has no name; name it, or drop it "
                "(a pandas index? write the CSV with index=False)",
            )
    dupes = sorted({name for name in header if header.count(name) > 1})
    if dupes:
        raise ManifestError(
            path, message=f"{path}: duplicate column names in the header: {', '.join(dupes)}"
        )
    rows = []
    for start, fields in records:
        if not any(cell.strip() for cell in fields):
            continue  # blank line, or an all-empty spreadsheet row
        row = start - 1
        if len(fields) != len(header):
            cells = dict(zip(header, fields, strict=False))
            reason = (
                f"malformed row: {len(fields)} fields but the header has {len(header)} "
                "(a missing or stray delimiter, or an unquoted delimiter inside a value?)"
            )
            ident = cells.get("id", "").strip() or None
            rows.append(_RawRow(row, {}, [Problem(row, ROW_FIELD, reason, ident)]))
            continue
        rows.append(_RawRow(row, dict(zip(header, fields, strict=True))))
    return header, rows


# --------------------------------------------------------------------------------------------
# Validating cells
# --------------------------------------------------------------------------------------------


def _parse_id(cells: dict[str, Any]) -> str:
    if "id" not in cells or cells["id"] is None:
        raise InvalidValue("missing id (every row needs a unique 'id')")
    value = cells["id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidValue(
            f"wrong type: id must be a string or an integer, got {_json_type(value)}"
        )
    if not value.strip():
        raise InvalidValue("empty id")
    return value.strip()


class _Digits(str):
    """A CSV label made of digits: a class name if the class list has it, else an index."""

    __slots__ = ()


def _parse_label_token(value: Any, from_csv: bool) -> str | int | None:
    """A label cell as a class name (str), an index (int), or None (unlabelled).

    In a CSV a digit string is a :class:`_Digits`, resolved once the class list is known.

    Example:
        >>> type(_parse_label_token("3", from_csv=True)).__name__, _parse_label_token("3", False)
        ('_Digits', '3')
        >>> _parse_label_token(None, from_csv=False), _parse_label_token(-1, from_csv=False)
        (None, None)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value == UNLABELLED else value
    if not isinstance(value, str):
        raise InvalidValue(
            f"wrong type: label must be a class name or an integer index, got {_json_type(value)}"
        )
    text = value.strip()
    if not text:
        return None
    if from_csv and _INT_RE.fullmatch(text):
        return None if int(text) == UNLABELLED else _Digits(text)
    return text


SPLIT_NAMES: tuple[str, ...] = ("train", "calibration", "test")
"""The split names mmsafe reads (fitting, calibration, evaluation). Other names are kept but
unused; a near miss of one of these (``Train``, ``tset``, ``calib``) is an error."""


def _parse_tag(value: Any, name: str) -> str:
    """A ``group`` or ``split`` cell: a string (integers are accepted and turned into strings).

    Example:
        >>> _parse_tag(" train ", "split"), _parse_tag("holdout", "split")
        ('train', 'holdout')
        >>> _parse_tag("Test", "split")
        Traceback (most recent call last):
        ...
        mmsafe.data.manifest.InvalidValue: unknown split 'Test': did you mean 'test'? ...
    """
    if value is None:
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise InvalidValue(f"wrong type: {name} must be a string, got {_json_type(value)}")
    text = value.strip()
    if name == "split" and text and text not in SPLIT_NAMES:
        near = [s for s in SPLIT_NAMES if text.lower() in (s, s[:5])]
        near = near or difflib.get_close_matches(text.lower(), SPLIT_NAMES, n=1, cutoff=0.75)
        if near:
            raise InvalidValue(
                f"unknown split {text!r}: did you mean {near[0]!r}? mmsafe reads the splits "
                f"{', '.join(SPLIT_NAMES)} (lower case); a row in any other split is not used"
            )
    return text


def _parse_meta(value: Any, from_csv: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if from_csv:
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidValue(
                f"malformed JSON in the meta column: {exc.msg} (character {exc.pos + 1})"
            ) from exc
        except ValueError as exc:  # an integer of more than 4300 digits
            raise InvalidValue(f"malformed JSON in the meta column: {exc}") from exc
        except RecursionError:
            raise InvalidValue(
                "malformed JSON in the meta column: nested too deeply (flatten it)"
            ) from None
    if not isinstance(value, dict):
        raise InvalidValue(f"wrong type: meta must be a JSON object, got {_json_type(value)}")
    return value


def _parse_row(
    raw: _RawRow, modalities: Sequence[str], manifest_dir: Path, from_csv: bool
) -> _Parsed:
    """Validate every cell of a row, collecting (not raising) its problems."""
    cells, row = raw.cells, raw.row
    parsed = _Parsed(row, None, {}, None, None, None, {}, list(raw.problems))
    if raw.problems:
        parsed.id = raw.problems[0].id
        return parsed
    problems: list[tuple[str, str]] = []
    try:
        parsed.id = _parse_id(cells)
    except InvalidValue as exc:
        problems.append(("id", str(exc)))
    for name in modalities:
        value = cells.get(name)
        if value is None:
            reason = f"missing {name} (the manifest has a {name!r} column: every row needs one)"
            problems.append((name, reason))
            continue
        try:
            parsed.values[name] = MODALITY_LOADERS[name](value, manifest_dir)
        except InvalidValue as exc:
            problems.append((name, str(exc)))
    try:
        parsed.label = _parse_label_token(cells.get("label"), from_csv)
    except InvalidValue as exc:
        problems.append(("label", str(exc)))
    for tag in ("group", "split"):
        if tag in cells:
            try:
                setattr(parsed, tag, _parse_tag(cells[tag], tag))
            except InvalidValue as exc:
                problems.append((tag, str(exc)))
    extra = {k: v for k, v in cells.items() if k not in _RESERVED and k not in modalities}
    if from_csv:
        extra = {k: v for k, v in extra.items() if v.strip()}
    try:
        parsed.meta = extra | _parse_meta(cells.get("meta"), from_csv)
    except InvalidValue as exc:
        problems.append(("meta", str(exc)))
    parsed.problems = [Problem(row, f, reason, parsed.id) for f, reason in problems]
    return parsed


def _parse_rows(
    rows: Sequence[_RawRow], modalities: Sequence[str], manifest_dir: Path, from_csv: bool
) -> list[_Parsed]:
    """Validate all rows, opening images on a few threads (PIL decodes without the GIL)."""

    def parse(raw: _RawRow) -> _Parsed:
        return _parse_row(raw, modalities, manifest_dir, from_csv)

    workers = min(8, os.cpu_count() or 1)
    if "image" not in modalities or len(rows) < 32 or workers == 1:
        return [parse(raw) for raw in rows]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(parse, rows))


# --------------------------------------------------------------------------------------------
# Classes and labels
# --------------------------------------------------------------------------------------------


def read_classes_file(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (surrounding whitespace and blank lines ignored).

    Raises:
        ManifestError: the file is unreadable, empty, or names a class twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, message=f"cannot read class list {path}: {exc}") from exc
    return _check_classes([line.strip() for line in text.splitlines() if line.strip()], path)


def _check_classes(classes: Sequence[str], path: Path, origin: str | None = None) -> list[str]:
    origin = origin or str(path)
    names = list(classes)
    if not names:
        raise ManifestError(path, message=f"the class list from {origin} is empty")
    bad = [c for c in names if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ManifestError(
            path, message=f"the class list from {origin} has blank or non-string names: {bad!r}"
        )
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise ManifestError(
            path, message=f"the class list from {origin} names classes twice: {', '.join(dupes)}"
        )
    return names


def _sidecar_paths(path: Path) -> tuple[Path, Path]:
    return path.with_name(f"{path.stem}.classes.txt"), path.with_name("classes.txt")


def _resolve_classes(
    path: Path, classes: Sequence[str] | None, parsed: Sequence[_Parsed]
) -> tuple[list[str], str]:
    """The class list and where it came from (``--classes``, a sidecar file, or the labels)."""
    if classes is not None:
        if isinstance(classes, str):
            raise ManifestError(
                path, message="classes must be a sequence of class names, not one string"
            )
        return _check_classes(classes, path, "--classes"), "--classes"
    for sidecar in _sidecar_paths(path):
        if sidecar.is_file():
            return read_classes_file(sidecar), sidecar.name
    names = {str(p.label) for p in parsed if type(p.label) is str}  # not _Digits: indices
    return sorted(names), "the labels"


def _label_index(label: str | int, classes: Sequence[str], origin: str, sidecar: str) -> int:
    if isinstance(label, str) and label in classes:
        return classes.index(label)
    if isinstance(label, _Digits):
        label = int(label)
    if isinstance(label, str):
        shown = ", ".join(classes[:10]) + (
            f", ... ({len(classes)} classes)" if len(classes) > 10 else ""
        )
        reason = f"label {label!r} not in the class list ({shown}; from {origin})"
        close = difflib.get_close_matches(label, classes, n=1)
        if close:
            reason += f"; did you mean {close[0]!r}?"
        raise InvalidValue(reason)
    if origin == "the labels":
        raise InvalidValue(
            f"integer label {label} needs a class list: pass --classes, or put one class per "
            f"line in {sidecar} next to the manifest"
        )
    if not 0 <= label < len(classes):
        raise InvalidValue(
            f"label index {label} out of range: {len(classes)} classes, so 0..{len(classes) - 1}"
        )
    return label


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_manifest(
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    skip_invalid: bool = False,
) -> Dataset:
    """Read and validate a JSONL or CSV manifest into a :class:`Dataset`.

    Every row is checked before anything is returned; all problems are reported together.

    Args:
        path: a ``.jsonl`` (or ``.ndjson``), ``.csv`` or ``.tsv`` file.
        classes: the class names labels refer to. When ``None``, a sidecar
            ``<manifest stem>.classes.txt`` or ``classes.txt`` next to the manifest is used, and
            failing that the sorted set of class-name labels seen.
        skip_invalid: drop invalid rows (recorded in ``Dataset.skipped``) instead of raising.

    Returns:
        The dataset; its ``image`` column is lazy (:class:`~mmsafe.data.columns.ImageFiles`:
        RGB ``uint8`` arrays decoded on access), ``name`` is the manifest's file name and
        ``source`` its absolute path.

    Raises:
        ManifestError: the file is missing, empty or of an unknown type; a header problem; any
            invalid row (unless ``skip_invalid``); or no valid row at all.
    """
    path = Path(path)
    fmt = _check_manifest_path(path)
    from_csv = fmt != "jsonl"
    rows, columns = _read_rows(path, fmt)
    modalities = [name for name in MODALITY_LOADERS if name in columns]
    if not modalities and (from_csv or any(not raw.problems for raw in rows)):
        raise ManifestError(
            path,
            message=f"{path}: no modality column; expected at least one of "
            f"{', '.join(MODALITY_LOADERS)} (found: {', '.join(columns) or 'nothing'})",
        )
    _warn_near_misses(path, columns)

    source = path.resolve()
    parsed = _parse_rows(rows, modalities, source.parent, from_csv)
    class_list, origin = _resolve_classes(path, classes, parsed)
    labels = _resolve_labels(parsed, class_list, origin, _sidecar_paths(path)[0].name)
    _flag_duplicate_ids(parsed)
    for p in parsed:
        p.problems.sort(key=lambda q: _field_rank(q.field, modalities))
    problems = [q for p in parsed for q in p.problems]
    good = [p for p in parsed if not p.problems]
    if problems and not skip_invalid:
        raise ManifestError(path, problems)
    if not good:
        raise ManifestError(
            path,
            problems,
            hint="No valid row is left to audit: fix these rows (--skip-invalid cannot help).",
        )
    return Dataset(
        name=path.name,
        ids=[p.id or "" for p in good],
        modalities={
            m: MODALITY_COLUMNS.get(m, list)([p.values[m] for p in good]) for m in modalities
        },
        labels=np.array([labels.get(p.row, UNLABELLED) for p in good], dtype=np.int64),
        classes=class_list,
        groups=[p.group or "" for p in good] if "group" in columns else None,
        splits=[p.split or "" for p in good] if "split" in columns else None,
        meta=[p.meta for p in good],
        skipped=_skipped_rows(problems),
        source=str(source),
    )


def _check_manifest_path(path: Path) -> str:
    """The manifest's format (``jsonl``, ``csv``, ``tsv``), or a ManifestError saying why not."""
    if not path.exists():
        raise ManifestError(path, message=f"manifest not found: {path} (cwd {Path.cwd()})")
    if not path.is_file():
        raise ManifestError(path, message=f"manifest is not a file: {path}")
    fmt = _format_of(path)
    if fmt is None:
        raise ManifestError(
            path,
            message=f"unknown manifest type {path.suffix or '(no extension)'!r} for {path}: "
            "use .jsonl (one JSON object per line) or .csv (with a header row)",
        )
    return fmt


def _read_rows(path: Path, fmt: str) -> tuple[list[_RawRow], list[str]]:
    """The raw rows and the column names (CSV: the header; JSONL: every key seen, in order)."""
    if fmt == "jsonl":
        rows = _read_jsonl(path)
        columns = list(dict.fromkeys(key for raw in rows for key in raw.cells))
    else:
        columns, rows = _read_csv(path, "\t" if fmt == "tsv" else ",")
        if "id" not in columns:
            reason = f"missing required column 'id' (columns: {', '.join(columns)})"
            raise ManifestError(
                path,
                [Problem(0, "id", reason)],
                hint="Add an 'id' column with a unique id per row.",
            )
    if not rows:
        raise ManifestError(path, message=f"{path}: empty manifest (no data rows)")
    return rows, columns


def _resolve_labels(
    parsed: Sequence[_Parsed], classes: Sequence[str], origin: str, sidecar: str
) -> dict[int, int]:
    """Row number -> class index for labelled rows; bad labels become problems of their row."""
    labels = {}
    for p in parsed:
        if p.label is None:
            continue
        try:
            labels[p.row] = _label_index(p.label, classes, origin, sidecar)
        except InvalidValue as exc:
            p.problems.append(Problem(p.row, "label", str(exc), p.id))
    return labels


def _flag_duplicate_ids(parsed: Sequence[_Parsed]) -> None:
    """The first row with an id owns it; later rows with the same id get a problem."""
    first_seen: dict[str, int] = {}
    for p in parsed:
        if p.id is None or any(q.field == ROW_FIELD for q in p.problems):
            continue
        if p.id in first_seen:
            reason = f"duplicate id {p.id!r} (first used in row {first_seen[p.id]})"
            p.problems.append(Problem(p.row, "id", reason, p.id))
        else:
            first_seen[p.id] = p.row


def _field_rank(name: str, modalities: Sequence[str]) -> int:
    """Order of fields within a row's problems: whole row, id, modalities, then the rest."""
    order = [ROW_FIELD, "id", *modalities, "label", "group", "split", "meta"]
    return order.index(name) if name in order else len(order)


def _warn_near_misses(path: Path, columns: Sequence[str]) -> None:
    """Warn about unknown columns that look like typos of known ones (they land in ``meta``)."""
    known = [*_RESERVED, *MODALITY_LOADERS]
    for column in columns:
        if column in known:
            continue
        close = difflib.get_close_matches(column, known, n=1, cutoff=0.8)
        if close:
            warnings.warn(
                f"{path}: column {column!r} is not a known column and goes into meta; "
                f"did you mean {close[0]!r}?",
                stacklevel=3,
            )


def write_manifest(dataset: Dataset, path: str | Path, image_dir: str = "images") -> Path:
    """Export a dataset as a JSONL manifest, images as PNG files beside it.

    Writes ``path`` (one JSON object per row: ``id``, each modality, ``label`` as the class name
    or ``null``, ``group``/``split`` when the dataset has them, ``meta``), the class list as the
    sidecar ``<stem>.classes.txt`` (so class order and unused classes survive a round trip), and
    ``<image_dir>/<id>.png`` per image. Every file is written atomically (temp file, then
    ``os.replace``); the manifest goes last.

    Meta values are made JSON-safe: numpy scalars become Python numbers, 0-d/1-d numpy arrays
    and tuples become lists, sets become sorted lists, ``Path`` becomes ``str``, NaN and
    infinities become ``null``; anything else JSON cannot hold (e.g. 2-d arrays such as defect
    masks) is dropped, with one warning naming the dropped keys.

    Args:
        dataset: the dataset to export.
        path: the manifest to write (``.jsonl`` or ``.ndjson``).
        image_dir: folder for the media files, relative to the manifest's folder.

    Returns:
        The manifest's path.

    Raises:
        ValueError: a bad path or ``image_dir``, a modality without a writer, or a class name a
            sidecar cannot hold.
    """
    path = Path(path)
    if _format_of(path) != "jsonl":
        raise ValueError(f"write_manifest writes JSONL: give a .jsonl path, not {path.name!r}")
    if Path(image_dir).is_absolute() or ".." in Path(image_dir).parts:
        raise ValueError(f"image_dir must be a folder inside the manifest's folder: {image_dir!r}")
    missing = [m for m in dataset.modality_names if m not in MODALITY_WRITERS]
    if missing:
        raise ValueError(
            f"no manifest writer for modalities {missing}; known: {list(MODALITY_WRITERS)}"
        )
    bad = [c for c in dataset.classes if not c.strip() or c != c.strip() or "\n" in c]
    if bad:
        raise ValueError(
            f"class names a sidecar file cannot hold (blank/padded/multi-line): {bad!r}"
        )
    if len(dataset) == 0:
        raise ValueError(f"nothing to write: dataset {dataset.name!r} has no rows")
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    stems = _file_stems(dataset.ids)
    dropped: set[str] = set()
    lines = []
    for i, ident in enumerate(dataset.ids):
        record: dict[str, Any] = {"id": ident}
        for name, values in dataset.modalities.items():
            stem = f"{Path(image_dir).as_posix()}/{stems[i]}"
            record[name] = MODALITY_WRITERS[name](values[i], root, stem)
        label = int(dataset.labels[i])
        record["label"] = dataset.classes[label] if label >= 0 else None
        if dataset.groups is not None:
            record["group"] = dataset.groups[i]
        if dataset.splits is not None:
            record["split"] = dataset.splits[i]
        meta = _jsonable(dataset.meta[i], dropped, "")
        if meta:
            record["meta"] = meta
        lines.append(json.dumps(record, ensure_ascii=False))
    if dropped:
        warnings.warn(
            "write_manifest: dropped meta values that JSON cannot hold: "
            + ", ".join(sorted(dropped)),
            stacklevel=2,
        )
    sidecar = _sidecar_paths(path)[0]
    if dataset.classes:
        atomic_write_text(sidecar, "".join(f"{c}\n" for c in dataset.classes))
    else:
        sidecar.unlink(missing_ok=True)  # a stale class list would relabel the rows
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))
    return path


def _file_stems(ids: Sequence[str]) -> list[str]:
    """File-name-safe, unique (even case-insensitively) names for ids.

    Example:
        >>> _file_stems(["a", "b/c", "A", ".."])
        ['a', 'b_c-be475211', 'A-6dcd4ce2', '_-9d891e73']
    """
    used: set[str] = set()
    out = []
    for ident in ids:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ident)[:80].strip(".") or "_"
        if slug != ident or slug.lower() in used:
            slug = f"{slug}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
        if slug.lower() in used:
            raise ValueError(f"cannot name files for ids uniquely (id {ident!r})")
        used.add(slug.lower())
        out.append(slug)
    return out


def _jsonable(value: Any, dropped: set[str], key: str) -> Any:
    """``value`` made JSON-safe, or the ``_DROP`` marker (its key is added to ``dropped``)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _jsonable(value.item(), dropped, key)
    if isinstance(value, np.ndarray) and value.ndim <= 1:
        return _jsonable(value.tolist(), dropped, key)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = f"{key}.{k}" if key else str(k)
            if not isinstance(k, (str, int, float, bool)):
                dropped.add(name)
                continue
            item = _jsonable(v, dropped, name)
            if item is not _DROP:
                out[str(k)] = item
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        out_list = [_jsonable(v, dropped, key) for v in items]
        if any(v is _DROP for v in out_list):
            dropped.add(key or "(value)")
            return _DROP
        return out_list
    dropped.add(key or "(value)")
    return _DROP


_DROP = object()
