"""A corpus of malformed inputs, each run through the real CLI: exit 2, a clear message, no crash.

Every case is one kind of bad input (a file, a ``--data`` spec, a flag). Each runs
``mmsafe audit ... --quick --checks performance`` and must exit 2 (a user error, not 3, an
internal crash), print no traceback, and say what is wrong, naming the row and field where there
is one. All of them fail before any model work (flags and manifests are validated before
training), so the whole corpus takes seconds.

The last part holds unusual but valid inputs that must load (grayscale, CMYK, palette images,
CRLF line endings with a BOM, quoted commas...), checked with ``load_manifest`` directly.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsafe.cli import app
from mmsafe.data.manifest import load_manifest

runner = CliRunner()

Builder = Callable[[Path], list[str]]
"""``builder(tmp_path) -> extra CLI args`` (``--data ...`` and any flag under test)."""


# ------------------------------------------------------------------------------------------
# Helpers that write bad files
# ------------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (6, 5), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def _jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Rows are dicts (dumped) or raw strings (written as they are)."""
    text = "".join(f"{r if isinstance(r, str) else json.dumps(r)}\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def _image_row(tmp: Path, image: object) -> list[str]:
    return ["--data", str(_jsonl(tmp / "m.jsonl", [{"id": "a", "image": image, "label": "x"}]))]


def _text_rows(tmp: Path, *rows: dict | str) -> list[str]:
    return ["--data", str(_jsonl(tmp / "m.jsonl", list(rows)))]


def _raw(tmp: Path, name: str, data: bytes) -> list[str]:
    (tmp / name).write_bytes(data)
    return ["--data", str(tmp / name)]


def _good_text(tmp: Path) -> list[str]:
    """A valid text-only manifest, for cases whose fault is a flag."""
    rows = [
        {"id": "a", "text": "a red circle", "label": "x"},
        {"id": "b", "text": "t", "label": "y"},
    ]
    return ["--data", str(_jsonl(tmp / "ok.jsonl", rows))]


def _truncated_png(tmp: Path) -> list[str]:
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    (tmp / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return _image_row(tmp, "cut.png")


def _symlink_loop(tmp: Path) -> list[str]:
    os.symlink(tmp / "loop_b.png", tmp / "loop_a.png")
    os.symlink(tmp / "loop_a.png", tmp / "loop_b.png")
    return _image_row(tmp, "loop_a.png")


def _directory_image(tmp: Path) -> list[str]:
    (tmp / "folder.png").mkdir()
    return _image_row(tmp, "folder.png")


def _text_file_as_image(tmp: Path) -> list[str]:
    (tmp / "notes.png").write_text("not an image\n", encoding="utf-8")
    return _image_row(tmp, str(tmp / "notes.png"))  # absolute path


def _bad_options_file(tmp: Path) -> list[str]:
    (tmp / "opts.json").write_bytes(b'{"calibration": {"n_bins": "\xff\xfe"}}')
    return [*_good_text(tmp), "--options", f"@{tmp / 'opts.json'}"]


def _manifest_folder(tmp: Path) -> list[str]:
    (tmp / "folder.jsonl").mkdir()
    return ["--data", str(tmp / "folder.jsonl")]


def _unknown_extension(tmp: Path) -> list[str]:
    (tmp / "rows.txt").write_text('{"id": "a", "text": "t"}\n', encoding="utf-8")
    return ["--data", str(tmp / "rows.txt")]


# ------------------------------------------------------------------------------------------
# The corpus: name -> (builder, phrases the message must contain)
# ------------------------------------------------------------------------------------------

ROW1 = "row 1"
DEEP = "[" * 5_000 + "]" * 5_000  # deeper than Python's recursion limit

CASES: dict[str, tuple[Builder, tuple[str, ...]]] = {
    # --- encodings ---------------------------------------------------------------------------
    "utf16_jsonl": (
        lambda t: _raw(t, "m.jsonl", '{"id": "a", "text": "t"}\n'.encode("utf-16")),
        (ROW1, "not UTF-8 text"),
    ),
    "utf16_csv": (
        lambda t: _raw(t, "m.csv", "id,text\na,t\n".encode("utf-16")),
        ("m.csv", "not UTF-8 text (invalid start byte)", "save the file as UTF-8"),
    ),
    "latin1_csv": (
        lambda t: _raw(t, "m.csv", "id,text\na,café\n".encode("latin-1")),
        ("m.csv", "not UTF-8 text (invalid continuation byte)", "save the file as UTF-8"),
    ),
    "latin1_jsonl": (
        lambda t: _raw(t, "m.jsonl", '{"id": "a", "text": "café"}\n'.encode("latin-1")),
        (ROW1, "not UTF-8 text (byte 0xe9"),
    ),
    "bom_then_bad_json": (
        lambda t: _raw(t, "m.jsonl", b'\xef\xbb\xbf{"id": "a", text}\n'),
        (ROW1, "malformed JSON line"),
    ),
    "invalid_utf8_in_text_cell": (
        lambda t: _raw(
            t, "m.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "bad \xff\xfe"}\n'
        ),
        ("row 2", "not UTF-8 text (byte 0xff"),
    ),
    # --- images ------------------------------------------------------------------------------
    "truncated_png": (_truncated_png, (ROW1, "field 'image'", "cut.png", "truncated")),
    "decompression_bomb": (
        lambda t: _image_row(t, _png_header_only(t / "bomb.png", 50_000, 50_000).name),
        (ROW1, "field 'image'", "bomb.png", "decompression bomb"),
    ),
    "oversized_image_below_pil_error": (  # PIL only warns between 1x and 2x its limit
        lambda t: _image_row(t, _png_header_only(t / "big.png", 12_000, 12_000).name),
        (ROW1, "field 'image'", "12000x12000", "downscale it"),
    ),
    "symlink_loop": (_symlink_loop, (ROW1, "field 'image'", "looping symbolic link")),
    "directory_as_image": (_directory_image, (ROW1, "field 'image'", "not a file: folder.png")),
    "dev_null_as_image": (
        lambda t: _image_row(t, "/dev/null"),
        (ROW1, "field 'image'", "not a file: /dev/null"),
    ),
    "text_file_as_image": (
        _text_file_as_image,
        (ROW1, "field 'image'", "not an image file PIL can read"),
    ),
    "missing_image": (
        lambda t: _image_row(t, "nowhere.png"),
        (ROW1, "field 'image'", "file not found: nowhere.png"),
    ),
    "url_image": (
        lambda t: _image_row(t, "https://example.com/a.png"),
        (ROW1, "field 'image'", "URLs are not supported"),
    ),
    # --- sizes -------------------------------------------------------------------------------
    "10mb_single_line_jsonl": (
        lambda t: _raw(t, "m.jsonl", b'{"id": "a", "text": "' + b"x" * 10_000_000),
        (ROW1, "malformed JSON line: Unterminated string"),
    ),
    "10mb_csv_cell": (
        lambda t: _raw(t, "m.csv", b"id,text\na," + b"x" * 10_000_000 + b"\n"),
        ("m.csv", "unreadable CSV at line 2", "field larger than field limit", "unclosed quote"),
    ),
    "deeply_nested_json": (  # was a RecursionError: exit 3
        lambda t: _text_rows(t, '{"id": "a", "text": "t", "meta": ' + DEEP + "}"),
        (ROW1, "nested too deeply"),
    ),
    "deeply_nested_csv_meta": (  # was a RecursionError: exit 3
        lambda t: _raw(t, "m.csv", f"id,text,meta\na,t,{DEEP}\n".encode()),
        (ROW1, "field 'meta'", "nested too deeply"),
    ),
    # --- JSON types and values ---------------------------------------------------------------
    "text_is_a_list": (
        lambda t: _text_rows(t, {"id": "a", "text": ["a", "b"]}),
        (ROW1, "field 'text'", "text must be a string, got list"),
    ),
    "image_is_a_number": (
        lambda t: _image_row(t, 3),
        (ROW1, "field 'image'", "image must be a path string, got integer 3"),
    ),
    "empty_text": (
        lambda t: _text_rows(t, {"id": "a", "text": "  "}),
        (ROW1, "field 'text'", "empty text"),
    ),
    "nan_label": (
        lambda t: _text_rows(t, '{"id": "a", "text": "t", "label": NaN}'),
        (ROW1, "field 'label'", "got number nan"),
    ),
    "infinite_label": (
        lambda t: _text_rows(t, '{"id": "a", "text": "t", "label": -Infinity}'),
        (ROW1, "field 'label'", "got number -inf"),
    ),
    "huge_integer_label": (
        lambda t: [*_text_rows(t, {"id": "a", "text": "t", "label": 10**30}), "--classes", "x,y"],
        (ROW1, "field 'label'", "out of range: 2 classes"),
    ),
    "integer_with_5000_digits": (
        lambda t: _text_rows(t, '{"id": "a", "text": "t", "label": ' + "9" * 5000 + "}"),
        (ROW1, "malformed row", "4300 digits"),
    ),
    "missing_id": (
        lambda t: _text_rows(t, {"text": "t"}),
        (ROW1, "field 'id'", "missing id"),
    ),
    "id_is_an_object": (
        lambda t: _text_rows(t, {"id": {"a": 1}, "text": "t"}),
        (ROW1, "field 'id'", "id must be a string or an integer"),
    ),
    "duplicate_ids": (
        lambda t: _text_rows(t, {"id": "a", "text": "t"}, {"id": "a", "text": "u"}),
        ("row 2", "field 'id'", "duplicate id 'a' (first used in row 1)"),
    ),
    "duplicate_json_keys": (
        lambda t: _text_rows(t, '{"id": "a", "text": "t", "text": "u"}'),
        (ROW1, "duplicate key 'text'"),
    ),
    "line_not_an_object": (
        lambda t: _text_rows(t, "[1, 2]"),
        (ROW1, "expected a JSON object per line, got list"),
    ),
    "trailing_garbage": (
        lambda t: _text_rows(t, '{"id": "a", "text": "t"} trailing'),
        (ROW1, "malformed JSON line: Extra data"),
    ),
    "meta_not_an_object": (
        lambda t: _text_rows(t, {"id": "a", "text": "t", "meta": [1, 2]}),
        (ROW1, "field 'meta'", "meta must be a JSON object, got list"),
    ),
    "split_not_a_string": (
        lambda t: _text_rows(t, {"id": "a", "text": "t", "split": ["train"]}),
        (ROW1, "field 'split'", "split must be a string"),
    ),
    "nul_byte_in_text": (
        lambda t: _raw(t, "m.csv", b"id,text,label\na,hello\x00world,x\nb,ok,y\n"),
        (ROW1, "field 'text'", "NUL byte"),
    ),
    "split_near_miss": (
        lambda t: _text_rows(t, {"id": "a", "text": "t", "split": "Test"}),
        (ROW1, "field 'split'", "unknown split 'Test': did you mean 'test'?"),
    ),
    "no_modality_column": (
        lambda t: _text_rows(t, {"id": "a", "caption": "t"}),
        ("no modality column", "image, text"),
    ),
    # --- CSV structure -----------------------------------------------------------------------
    "csv_ragged_row": (
        lambda t: _raw(t, "m.csv", b"id,text\na,t,extra\n"),
        (ROW1, "3 fields but the header has 2"),
    ),
    "csv_malformed_meta": (
        lambda t: _raw(t, "m.csv", b'id,text,meta\na,t,"{bad"\n'),
        (ROW1, "field 'meta'", "malformed JSON in the meta column"),
    ),
    "csv_no_id_column": (
        lambda t: _raw(t, "m.csv", b"name,text\na,t\n"),
        ("row 0", "missing required column 'id'"),
    ),
    "csv_duplicate_header": (
        lambda t: _raw(t, "m.csv", b"id,text,text\na,t,u\n"),
        ("duplicate column names in the header: text",),
    ),
    "csv_unnamed_header_column": (
        lambda t: _raw(t, "m.csv", b",id,text\n0,a,t\n"),
        ("column 1 of the header has no name", "index=False"),
    ),
    "empty_jsonl": (lambda t: _raw(t, "m.jsonl", b""), ("m.jsonl", "empty manifest")),
    "empty_csv": (
        lambda t: _raw(t, "m.csv", b""),
        ("m.csv", "empty manifest (no header, no rows)"),
    ),
    "csv_header_only": (
        lambda t: _raw(t, "m.csv", b"id,text\n"),
        ("m.csv", "empty manifest (no data rows)"),
    ),
    # --- the manifest path -------------------------------------------------------------------
    "missing_manifest": (
        lambda t: ["--data", str(t / "absent.jsonl")],
        ("manifest not found", "absent.jsonl"),
    ),
    "manifest_is_a_folder": (_manifest_folder, ("manifest is not a file", "folder.jsonl")),
    "unknown_manifest_extension": (_unknown_extension, ("unknown manifest type '.txt'",)),
    "data_names_nothing": (
        lambda t: ["--data", "no-such-world"],
        ("neither a built-in world nor a manifest file",),
    ),
    # --- classes -----------------------------------------------------------------------------
    "label_not_in_classes": (
        lambda t: [*_good_text(t), "--classes", "x,yy,z"],
        ("row 2", "field 'label'", "label 'y' not in the class list", "did you mean 'yy'"),
    ),
    "classes_named_twice": (
        lambda t: [*_good_text(t), "--classes", "x,y,x"],
        ("names classes twice: x",),
    ),
    # --- world specs -------------------------------------------------------------------------
    "world_unknown_knob": (
        lambda t: ["--data", "shapes:bogus=1"],
        ("Unknown knob 'bogus'", "Valid knobs"),
    ),
    "world_negative_knob": (
        lambda t: ["--data", "shapes:seed=-1"],
        ("seed=-1 must be >= 0",),
    ),
    "world_knob_not_a_number": (
        lambda t: ["--data", "shapes:n=many"],
        ("Knob 'n' needs an integer, got 'many'",),
    ),
    "world_knob_400_digits": (  # was an OverflowError: exit 3
        lambda t: ["--data", "shapes:n=" + "1" * 400],
        ("Knob 'n' is out of range",),
    ),
    "world_too_large": (  # was a MemoryError for shapes (745 GiB): exit 3
        lambda t: ["--data", "shapes-rec:n_users=5000000"],
        ("n_users=5000000 is more than 1,000,000 rows", "use a manifest"),
    ),
    "world_knob_malformed_pair": (
        lambda t: ["--data", "shapes:n"],
        ("Malformed knob 'n'", "use knob=value"),
    ),
    # --- flags -------------------------------------------------------------------------------
    "options_invalid_json": (
        lambda t: [*_good_text(t), "--options", "{bad"],
        ("--options: not valid JSON", "Write e.g."),
    ),
    "options_unknown_check": (
        lambda t: [*_good_text(t), "--options", '{"nope": {}}'],
        ("unknown check 'nope'", "mmsafe list-checks"),
    ),
    "options_unknown_argument": (
        lambda t: [*_good_text(t), "--options", '{"calibration": {"bins": 3}}'],
        ("has no option 'bins'", "n_bins"),
    ),
    "options_not_objects": (
        lambda t: [*_good_text(t), "--options", '{"calibration": 3}'],
        ("expected a JSON object of objects",),
    ),
    "options_5000_digit_number": (  # was a ValueError outside the caught JSONDecodeError
        lambda t: [*_good_text(t), "--options", '{"calibration": {"n_bins": ' + "9" * 5000 + "}}"],
        ("--options: not valid JSON", "4300 digits"),
    ),
    "options_file_not_utf8": (_bad_options_file, ("--options file", "not UTF-8")),
    "options_file_missing": (
        lambda t: [*_good_text(t), "--options", f"@{t / 'absent.json'}"],
        ("cannot read it", "absent.json"),
    ),
    "fail_on_bad_operator": (
        lambda t: [*_good_text(t), "--fail-on", "calibration.ece=>0.1"],
        ("is not of the form '<check>.<metric><op><value>'",),
    ),
    "fail_on_not_a_number": (
        lambda t: [*_good_text(t), "--fail-on", "calibration.ece>high"],
        ("'high' is not a number",),
    ),
    "fail_on_nan_threshold": (  # was accepted: a gate that can never fail
        lambda t: [*_good_text(t), "--fail-on", "calibration.ece>nan"],
        ("must be a finite number",),
    ),
    "checks_match_nothing": (
        lambda t: [*_good_text(t), "--checks", "nothing.*"],
        ("--checks 'nothing.*' matches no check",),
    ),
    "unknown_model": (
        lambda t: [*_good_text(t), "--model", "no-such-model"],
        ("Unknown model 'no-such-model'", "mmsafe list-models"),
    ),
}


def _audit(args: list[str], out: Path) -> tuple[int, str]:
    base = ["audit", "--model", "tiny-clip", "--quick", "--checks", "performance"]
    result = runner.invoke(app, [*base, "--out", str(out), *args], env={"COLUMNS": "1000"})
    return result.exit_code, result.output


def test_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({tuple(phrases) for _, phrases in CASES.values()}) == len(CASES)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # then our error
@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_is_a_clear_user_error(name: str, tmp_path: Path) -> None:
    build, phrases = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    code, output = _audit(build(work), tmp_path / "out")
    flat = " ".join(output.split())  # a long message may wrap
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    assert code == 2, f"exit {code}:\n{output}"
    assert flat.startswith("error:") or "\nerror:" in output, output
    for phrase in phrases:
        assert phrase in flat, f"{phrase!r} not in:\n{output}"
    assert not (tmp_path / "out" / "mmsafe.log").exists()  # a log means an internal error


# ------------------------------------------------------------------------------------------
# Unusual but valid inputs: these must load
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("CMYK", ".jpg"), ("CMYK", ".tif"), ("RGBA", ".png"), ("P", ".png"),
     ("LA", ".png"), ("I;16", ".png"), ("1", ".png")],
)  # fmt: skip
def test_unusual_image_modes_load_as_rgb(tmp_path: Path, mode: str, suffix: str) -> None:
    image = Image.new(mode, (7, 4))
    image.save(tmp_path / f"a{suffix}")
    _png(tmp_path / "tiny.png", size=(1, 1))
    rows = [
        {"id": "a", "image": f"a{suffix}", "label": "x"},
        {"id": "one-pixel", "image": "tiny.png", "label": "y"},
    ]
    ds = load_manifest(_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.ids == ["a", "one-pixel"]
    first, second = ds.modalities["image"][0], ds.modalities["image"][1]
    assert first.shape == (4, 7, 3) and first.dtype == np.uint8
    assert second.shape == (1, 1, 3)


def test_crlf_with_bom_jsonl_loads(tmp_path: Path) -> None:
    lines = ['{"id": "a", "text": "one", "label": "x"}', '{"id": "b", "text": "two", "label": "y"}']
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    ds = load_manifest(path)
    assert ds.ids == ["a", "b"]
    assert list(ds.modalities["text"]) == ["one", "two"]
    assert ds.classes == ["x", "y"]


def test_crlf_with_bom_csv_and_quoted_cells_load(tmp_path: Path) -> None:
    text = 'id,text,label\r\na,"red, round, small",x\r\nb,"say ""hi""\r\nthen go",y\r\n'
    path = tmp_path / "m.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    ds = load_manifest(path)
    assert ds.ids == ["a", "b"]  # the BOM is not part of the first column's name
    assert list(ds.modalities["text"]) == ["red, round, small", 'say "hi"\r\nthen go']
    assert ds.labels.tolist() == [0, 1]


def test_image_path_with_spaces_and_unicode_loads(tmp_path: Path) -> None:
    _png(tmp_path / "dir with space" / "café ☕.png")
    rows = [{"id": "a", "image": "dir with space/café ☕.png", "text": "t"}]
    ds = load_manifest(_jsonl(tmp_path / "m.jsonl", rows))
    assert ds.modalities["image"][0].shape == (5, 6, 3)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(checks=[1, 2]),  # not a mapping
        lambda c: c["checks"]["a.x"].update(metrics="oops"),
        lambda c: c["checks"]["a.x"]["metrics"]["m"].update(value="high"),
    ],
)
def test_compare_on_a_malformed_card_is_a_user_error(tmp_path: Path, edit) -> None:
    card = {"checks": {"a.x": {"status": "ok", "metrics": {"m": {"value": 0.5, "ci": None}}}}}
    (tmp_path / "a.json").write_text(json.dumps(card))
    edit(card)
    (tmp_path / "b.json").write_text(json.dumps(card))
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "cannot compare" in res.output
    assert "Traceback" not in res.output
