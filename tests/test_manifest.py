from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsafe.data.dataset import Dataset, SkippedRow
from mmsafe.data.manifest import (
    MAX_LISTED_PROBLEMS,
    MODALITY_LOADERS,
    ManifestError,
    Problem,
    load_manifest,
    write_manifest,
)

RNG = np.random.default_rng(0)


def make_png(path: Path, seed: int = 0, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    """Write a small random RGB PNG and return its pixels (H, W, 3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Rows are dicts (dumped) or raw strings (written as they are, for malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def pngs(tmp_path: Path) -> dict[str, np.ndarray]:
    """Three images under tmp_path/imgs."""
    return {
        name: make_png(tmp_path / "imgs" / f"{name}.png", seed=i) for i, name in enumerate("abc")
    }


def good_rows() -> list[dict]:
    return [
        {"id": "a", "image": "imgs/a.png", "text": "a red circle", "label": "circle"},
        {"id": "b", "image": "imgs/b.png", "text": "a blue square", "label": "square"},
        {"id": "c", "image": "imgs/c.png", "text": "a green circle", "label": "circle"},
    ]


def load_error(path: Path, **kw) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kw)
    return info.value


# ------------------------------------------------------------------------------------------
# The happy path
# ------------------------------------------------------------------------------------------


def test_loads_images_texts_labels(tmp_path, pngs):
    path = write_jsonl(tmp_path / "eval.jsonl", good_rows())
    ds = load_manifest(path)
    assert isinstance(ds, Dataset)
    assert ds.ids == ["a", "b", "c"]
    assert ds.modality_names == ("image", "text")
    assert ds.classes == ["circle", "square"]  # inferred: the sorted set of labels
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.modalities["text"] == ["a red circle", "a blue square", "a green circle"]
    for name, img in zip("abc", ds.modalities["image"], strict=True):
        assert img.dtype == np.uint8 and img.shape == (5, 6, 3)
        np.testing.assert_array_equal(img, pngs[name])
    assert ds.name == "eval.jsonl"
    assert ds.source == str(path.resolve())
    assert ds.groups is None and ds.splits is None
    assert ds.skipped == []


def test_image_modes_become_rgb_uint8(tmp_path):
    Image.new("L", (4, 3), color=77).save(tmp_path / "gray.png")
    Image.new("RGBA", (4, 3), color=(10, 20, 30, 40)).save(tmp_path / "rgba.png")
    path = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "g", "image": "gray.png"}, {"id": "r", "image": "rgba.png"}]
    )
    gray, rgba = load_manifest(path).modalities["image"]
    np.testing.assert_array_equal(gray, np.full((3, 4, 3), 77, dtype=np.uint8))
    np.testing.assert_array_equal(rgba, np.tile(np.array([10, 20, 30], np.uint8), (3, 4, 1)))
    assert gray.flags.writeable


def test_only_text_modality_and_unlabelled_rows(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "1", "text": "x", "label": None},
            {"id": 2, "text": "y"},
            {"id": "3", "text": "z", "label": ""},
            {"id": "4", "text": "w", "label": "dog"},
        ],
    )
    ds = load_manifest(path)
    assert ds.modality_names == ("text",)
    assert ds.ids == ["1", "2", "3", "4"]  # integer ids become strings
    assert ds.labels.tolist() == [-1, -1, -1, 0]
    assert ds.classes == ["dog"]


def test_group_split_meta(tmp_path):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "text": "x", "group": "g1", "split": "test", "meta": {"k": [1, 2]}},
            {"id": "b", "text": "y", "split": "calibration", "source": "web"},
        ],
    )
    ds = load_manifest(path)
    assert ds.groups == ["g1", ""]
    assert ds.splits == ["test", "calibration"]
    assert ds.meta == [{"k": [1, 2]}, {"source": "web"}]  # unknown keys go into meta
    assert ds.split("test").ids == ["a"]


# ------------------------------------------------------------------------------------------
# One test per kind of bad row: the message names the row, the field and the reason
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path, pngs):
    rows = good_rows()
    rows[1]["image"] = "imgs/nope.png"
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    folder = tmp_path.resolve()
    expected = f"row 2 (id 'b'), field 'image': file not found: imgs/nope.png (looked in {folder})"
    assert expected in str(err)
    assert err.problems == [
        Problem(2, "image", f"file not found: imgs/nope.png (looked in {folder})", "b")
    ]
    assert err.path == tmp_path / "m.jsonl"


@pytest.mark.parametrize("content", [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_unreadable_image(tmp_path, pngs, content):
    (tmp_path / "imgs" / "b.png").write_bytes(content)
    err = load_error(write_jsonl(tmp_path / "m.jsonl", good_rows()))
    assert "row 2 (id 'b'), field 'image': unreadable image: imgs/b.png" in str(err)
    assert [(p.row, p.field) for p in err.problems] == [(2, "image")]


def test_truncated_image(tmp_path, pngs):
    data = (tmp_path / "imgs" / "c.png").read_bytes()
    (tmp_path / "imgs" / "c.png").write_bytes(data[: len(data) // 2])
    err = load_error(write_jsonl(tmp_path / "m.jsonl", good_rows()))
    assert "row 3 (id 'c'), field 'image': unreadable image: imgs/c.png" in str(err)


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text(tmp_path, pngs, text):
    rows = good_rows()
    rows[2]["text"] = text
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert "row 3 (id 'c'), field 'text': empty text" in str(err)


def test_label_not_in_class_list(tmp_path, pngs):
    rows = good_rows()
    rows[0]["label"] = "cirle"
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows), classes=["circle", "square"])
    msg = str(err)
    assert "row 1 (id 'a'), field 'label': label 'cirle' not in the class list" in msg
    assert "did you mean 'circle'?" in msg
    assert [(p.row, p.field) for p in err.problems] == [(1, "label")]


def test_duplicate_id(tmp_path, pngs):
    rows = good_rows()
    rows[2]["id"] = "a"
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert "row 3 (id 'a'), field 'id': duplicate id 'a' (first used in row 1)" in str(err)
    assert [(p.row, p.field) for p in err.problems] == [(3, "id")]


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("text", 5, "text must be a string, got integer 5"),
        ("text", ["a"], "text must be a string, got list ['a']"),
        ("image", 3, "image must be a path string, got integer 3"),
        ("label", 1.5, "label must be a class name or an integer index, got number 1.5"),
        ("label", {"x": 1}, "got object {'x': 1}"),
        ("label", True, "got boolean True"),
        ("id", 2.0, "id must be a string or an integer, got number 2.0"),
        ("id", ["a"], "got list ['a']"),
        ("meta", "note", "meta must be a JSON object, got string 'note'"),
        ("group", [1], "group must be a string, got list [1]"),
    ],
)
def test_wrong_type(tmp_path, pngs, field, value, shown):
    rows = good_rows()
    rows[1][field] = value
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [(p.row, p.field) for p in err.problems] == [(2, field)]
    line = err.problems[0].describe()
    assert re.match(r"row 2\b", line) and f"field '{field}': wrong type: " in line
    assert shown in line
    assert line in str(err)


def test_malformed_json_line_uses_the_line_number(tmp_path, pngs):
    rows = good_rows()
    lines = [json.dumps(rows[0]), "", '{"id": "b", "image": "imgs/b.png",, }', json.dumps(rows[2])]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    err = load_error(path)
    assert [(p.row, p.field) for p in err.problems] == [(3, "(row)")]
    assert "row 3: malformed JSON line: Expecting property name" in str(err)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('["a", "b"]', "expected a JSON object per line, got list"),
        ('{"id": "x", "text": "t", "id": "y"}', "duplicate key 'id'"),
    ],
)
def test_json_line_that_is_not_a_row(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "ok", "text": "t"}, line])
    err = load_error(path)
    assert err.problems[0].row == 2 and err.problems[0].field == "(row)"
    assert reason in str(err)


def test_missing_id_jsonl(tmp_path, pngs):
    rows = good_rows()
    del rows[1]["id"]
    rows[2]["id"] = None
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [(p.row, p.field, p.id) for p in err.problems] == [(2, "id", None), (3, "id", None)]
    assert "row 2, field 'id': missing id" in str(err)


def test_missing_id_column_csv(tmp_path, pngs):
    path = write_csv(tmp_path / "m.csv", ["image", "text"], [["imgs/a.png", "x"]])
    err = load_error(path)
    assert err.problems == [
        Problem(0, "id", "missing required column 'id' (columns: image, text)", None)
    ]
    assert "row 0 (header), field 'id': missing required column 'id'" in str(err)
    # Skipping rows cannot repair a header.
    assert load_error(path, skip_invalid=True).problems == err.problems


def test_missing_modality_value(tmp_path, pngs):
    rows = good_rows()
    del rows[0]["text"]
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert [(p.row, p.field) for p in err.problems] == [(1, "text")]
    assert "missing text" in str(err)


def test_label_index_errors(tmp_path):
    rows = [{"id": "a", "text": "x", "label": 5}, {"id": "b", "text": "y", "label": 0}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    err = load_error(path, classes=["cat", "dog"])
    assert [(p.row, p.field) for p in err.problems] == [(1, "label")]
    assert "label index 5 out of range: 2 classes, so 0..1" in str(err)
    # Without a class list an integer label cannot be resolved.
    err = load_error(path)
    assert [(p.row, p.field) for p in err.problems] == [(1, "label"), (2, "label")]
    assert "integer label 5 needs a class list" in str(err)
    assert "m.classes.txt" in str(err)


# ------------------------------------------------------------------------------------------
# Reporting: all problems in one error, capped, with what to do
# ------------------------------------------------------------------------------------------


def test_several_bad_rows_reported_in_one_error(tmp_path, pngs):
    rows = [
        *good_rows(),
        {"id": "d", "image": "imgs/missing.png", "text": "", "label": "circle"},
        {"id": "a", "image": "imgs/a.png", "text": "dup", "label": "circle"},
        {"id": "f", "image": "imgs/a.png", "text": 7, "label": "triangle"},
    ]
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows), classes=["circle", "square"])
    got = [(p.row, p.field) for p in err.problems]
    assert got == [(4, "image"), (4, "text"), (5, "id"), (6, "text"), (6, "label")]
    lines = str(err).splitlines()
    assert lines[0] == f"3 invalid rows in {tmp_path / 'm.jsonl'} (5 problems):"
    assert lines[1:6] == [f"  {p.describe()}" for p in err.problems]
    assert "--skip-invalid" in lines[-1] and "fix these rows" in lines[-1].lower()


def test_many_image_rows_keep_their_order(tmp_path, pngs):
    # Enough image rows to take the threaded path; results and problems stay in file order.
    names = ["a", "b", "c", "missing"] * 10
    rows = [{"id": f"r{i}", "image": f"imgs/{n}.png", "text": "t"} for i, n in enumerate(names)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    err = load_error(path)
    assert [p.row for p in err.problems] == [i + 1 for i, n in enumerate(names) if n == "missing"]
    ds = load_manifest(path, skip_invalid=True)
    assert ds.ids == [f"r{i}" for i, n in enumerate(names) if n != "missing"]
    kept = [n for n in names if n != "missing"]
    for name, img in zip(kept, ds.modalities["image"], strict=True):
        np.testing.assert_array_equal(img, pngs[name])


def test_listing_is_capped(tmp_path):
    rows = [{"id": f"r{i}", "text": ""} for i in range(MAX_LISTED_PROBLEMS + 7)]
    err = load_error(write_jsonl(tmp_path / "m.jsonl", rows))
    assert len(err.problems) == MAX_LISTED_PROBLEMS + 7
    lines = str(err).splitlines()
    assert lines[0].startswith(f"{MAX_LISTED_PROBLEMS + 7} invalid rows in ")
    assert "  ... and 7 more" in lines
    assert len(lines) == 1 + MAX_LISTED_PROBLEMS + 1 + 1


def test_skip_invalid_keeps_good_rows_and_records_the_rest(tmp_path, pngs):
    rows = [
        *good_rows(),
        {"id": "d", "image": "imgs/missing.png", "text": "", "label": "circle"},
        "{not json",
        {"id": "a", "image": "imgs/a.png", "text": "dup", "label": "square"},
    ]
    ds = load_manifest(write_jsonl(tmp_path / "m.jsonl", rows), skip_invalid=True)
    assert ds.ids == ["a", "b", "c"]
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.classes == ["circle", "square"]
    np.testing.assert_array_equal(ds.modalities["image"][1], pngs["b"])
    assert [(s.row, s.field, s.id) for s in ds.skipped] == [
        (4, "image, text", "d"),
        (5, "(row)", None),
        (6, "id", "a"),
    ]
    assert ds.skipped[0].reason.startswith("file not found: imgs/missing.png")
    assert ds.skipped[0].reason.endswith("; empty text")
    assert ds.skipped[1].reason.startswith("malformed JSON line")
    assert ds.skipped[2] == SkippedRow(6, "id", "duplicate id 'a' (first used in row 1)", "a")


def test_skip_invalid_with_no_valid_row_still_raises(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "text": ""}, {"id": "b", "text": " "}])
    err = load_error(path, skip_invalid=True)
    assert len(err.problems) == 2
    assert "No valid row" in str(err).splitlines()[-1]


# ------------------------------------------------------------------------------------------
# File-level errors
# ------------------------------------------------------------------------------------------


def test_missing_manifest(tmp_path):
    err = load_error(tmp_path / "nope.jsonl")
    assert "manifest not found" in str(err) and "nope.jsonl" in str(err)
    assert err.problems == []


def test_unknown_extension(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("[]")
    msg = str(load_error(path))
    assert "unknown manifest type '.json'" in msg and ".jsonl" in msg and ".csv" in msg


@pytest.mark.parametrize(
    ("name", "content"), [("m.jsonl", "\n\n"), ("m.csv", ""), ("m.csv", "id,text\n")]
)
def test_empty_manifest(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert "empty manifest" in str(load_error(path))


def test_no_modality_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "label": "x", "caption": "hi"}])
    msg = str(load_error(path))
    assert "no modality column" in msg and "image, text" in msg and "caption" in msg


# ------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------


def test_csv_and_jsonl_load_the_same_dataset(tmp_path, pngs):
    rows = good_rows()
    for row, group in zip(rows, ["g1", "g2", "g1"], strict=True):
        row["group"] = group
        row["split"] = "test"
        row["meta"] = {"source": "web", "n": 1}
    jsonl = load_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    header = ["id", "image", "text", "label", "group", "split", "source", "meta"]
    csv_rows = [
        [r["id"], r["image"], r["text"], r["label"], r["group"], r["split"], "web", '{"n": 1}']
        for r in rows
    ]
    from_csv = load_manifest(write_csv(tmp_path / "m.csv", header, csv_rows))
    assert from_csv.ids == jsonl.ids
    assert from_csv.classes == jsonl.classes
    np.testing.assert_array_equal(from_csv.labels, jsonl.labels)
    assert from_csv.modalities["text"] == jsonl.modalities["text"]
    for a, b in zip(from_csv.modalities["image"], jsonl.modalities["image"], strict=True):
        assert a.tobytes() == b.tobytes() and a.shape == b.shape
    assert from_csv.groups == jsonl.groups == ["g1", "g2", "g1"]
    assert from_csv.splits == jsonl.splits
    assert from_csv.meta == jsonl.meta == [{"source": "web", "n": 1}] * 3
    assert from_csv.fingerprint() == jsonl.fingerprint()


def test_csv_row_numbers_count_the_header_as_row_0(tmp_path, pngs):
    header = ["id", "image", "text", "label"]
    rows = [
        ["a", "imgs/a.png", "line one\nline two", "circle"],  # one record over lines 2-3
        ["b", "imgs/b.png", "", "square"],  # line 4 -> row 3
        ["c", "imgs/c.png", "ok", "circle", "extra"],  # line 5 -> row 4
    ]
    err = load_error(write_csv(tmp_path / "m.csv", header, rows))
    assert [(p.row, p.field) for p in err.problems] == [(3, "text"), (4, "(row)")]
    msg = str(err)
    assert "row 3 (id 'b'), field 'text': empty text" in msg
    assert "row 4 (id 'c'): malformed row: 5 fields but the header has 4" in msg
    assert "row N starts on line N+1" in msg


def test_csv_meta_column_must_be_a_json_object(tmp_path):
    header = ["id", "text", "meta"]
    path = write_csv(tmp_path / "m.csv", header, [["a", "x", "{bad"], ["b", "y", "[1]"]])
    err = load_error(path)
    assert [(p.row, p.field) for p in err.problems] == [(1, "meta"), (2, "meta")]
    assert "malformed JSON in the meta column" in str(err)
    assert "wrong type: meta must be a JSON object, got list [1]" in str(err)


def test_tsv(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\ttext\tlabel\na\thello, world\tx\n")
    ds = load_manifest(path)
    assert ds.modalities["text"] == ["hello, world"] and ds.classes == ["x"]


# ------------------------------------------------------------------------------------------
# Paths, labels and class lists
# ------------------------------------------------------------------------------------------


def test_relative_image_paths_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    data = tmp_path / "data"
    img = make_png(data / "imgs" / "x.png", seed=3)
    elsewhere = tmp_path / "elsewhere"
    make_png(elsewhere / "imgs" / "x.png", seed=4)  # a decoy with the same relative path
    path = write_jsonl(data / "m.jsonl", [{"id": "x", "image": "imgs/x.png"}])
    monkeypatch.chdir(elsewhere)
    ds = load_manifest(Path("..") / "data" / "m.jsonl")
    np.testing.assert_array_equal(ds.modalities["image"][0], img)
    assert ds.source == str(path.resolve())


def test_absolute_image_path(tmp_path):
    img = make_png(tmp_path / "far" / "x.png", seed=5)
    (tmp_path / "m").mkdir()
    path = write_jsonl(
        tmp_path / "m" / "m.jsonl", [{"id": "x", "image": str(tmp_path / "far" / "x.png")}]
    )
    np.testing.assert_array_equal(load_manifest(path).modalities["image"][0], img)


def test_integer_labels_with_classes(tmp_path):
    classes = ["zebra", "ant", "cat"]
    jsonl = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "text": "x", "label": 2},
            {"id": "b", "text": "y", "label": "ant"},
            {"id": "c", "text": "z", "label": 0},
            {"id": "d", "text": "w", "label": -1},
        ],
    )
    assert load_manifest(jsonl, classes=classes).labels.tolist() == [2, 1, 0, -1]
    csv_path = write_csv(
        tmp_path / "m.csv",
        ["id", "text", "label"],
        [["a", "x", "2"], ["b", "y", "ant"], ["c", "z", " 0 "]],
    )
    ds = load_manifest(csv_path, classes=classes)
    assert ds.labels.tolist() == [2, 1, 0]
    assert ds.classes == classes


def test_csv_digit_label_that_is_a_class_name_means_the_name(tmp_path):
    path = write_csv(
        tmp_path / "m.csv", ["id", "text", "label"], [["a", "x", "1"], ["b", "y", "0"]]
    )
    ds = load_manifest(path, classes=["1", "2"])
    # "1" is a class name (index 0); "0" is not, so it is an index.
    assert ds.labels.tolist() == [0, 0]


def test_classes_sidecar(tmp_path):
    rows = [{"id": "a", "text": "x", "label": "cat"}, {"id": "b", "text": "y", "label": 0}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    (tmp_path / "classes.txt").write_text("ant\ncat\n")
    assert load_manifest(path).classes == ["ant", "cat"]
    # The manifest's own sidecar beats classes.txt; order is kept, blank lines ignored.
    (tmp_path / "m.classes.txt").write_text("zebra\n\n  cat \nbee\n")
    ds = load_manifest(path)
    assert ds.classes == ["zebra", "cat", "bee"]
    assert ds.labels.tolist() == [1, 0]
    # An explicit class list beats both.
    assert load_manifest(path, classes=["cat", "dog"]).labels.tolist() == [0, 0]
    # A label missing from the sidecar is an error that names the sidecar.
    (tmp_path / "m.classes.txt").write_text("zebra\nbee\n")
    err = load_error(path)
    assert "label 'cat' not in the class list (zebra, bee; from m.classes.txt)" in str(err)


@pytest.mark.parametrize(
    ("classes", "reason"),
    [([], "empty"), (["a", "a"], "names classes twice"), ("ab", "not one string")],
)
def test_bad_class_lists(tmp_path, classes, reason):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "text": "x"}])
    assert reason in str(load_error(path, classes=classes))


def test_modality_loaders_mapping_defines_the_modalities():
    assert set(MODALITY_LOADERS) >= {"image", "text"}


def test_registering_a_modality_adds_a_column(tmp_path, monkeypatch):
    def load_number(value, manifest_dir):
        return float(value)

    monkeypatch.setitem(MODALITY_LOADERS, "tabular", load_number)
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "text": "x", "tabular": "1.5"}])
    ds = load_manifest(path)
    assert ds.modality_names == ("text", "tabular")
    assert ds.modalities["tabular"] == [1.5]


def test_near_miss_column_warns(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "a", "text": "x", "lable": "cat"}])
    with pytest.warns(UserWarning, match="did you mean 'label'"):
        ds = load_manifest(path)
    assert ds.meta == [{"lable": "cat"}] and ds.labels.tolist() == [-1]


# ------------------------------------------------------------------------------------------
# write_manifest
# ------------------------------------------------------------------------------------------


def make_dataset() -> Dataset:
    imgs = [RNG.integers(0, 256, (4 + i, 7, 3), dtype=np.uint8) for i in range(4)]
    return Dataset(
        name="world",
        ids=["s0", "dir/s1", "S0", "s3"],
        modalities={"image": imgs, "text": ["red circle", "blue square", "ünïcode ✓", "x"]},
        labels=np.array([2, 0, -1, 2]),
        classes=["square", "triangle", "circle"],  # not sorted; "triangle" unused
        groups=["a", "b", "a", "b"],
        splits=["test", "test", "calibration", "test"],
        meta=[
            {"flaw": "spurious", "score": np.float32(0.5), "box": np.array([1, 2, 3])},
            {"mask": np.zeros((4, 7), dtype=bool), "n": np.int64(3)},
            {},
            {"nested": {"t": (1, 2)}},
        ],
    )


def test_write_then_load_round_trip(tmp_path):
    ds = make_dataset()
    with pytest.warns(UserWarning, match="mask"):
        out = write_manifest(ds, tmp_path / "export" / "world.jsonl")
    assert out == tmp_path / "export" / "world.jsonl"
    assert (tmp_path / "export" / "world.classes.txt").read_text() == "square\ntriangle\ncircle\n"
    back = load_manifest(out)
    assert back.ids == ds.ids
    assert back.classes == ds.classes
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.modalities["text"] == ds.modalities["text"]
    for a, b in zip(back.modalities["image"], ds.modalities["image"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.groups == ds.groups and back.splits == ds.splits
    assert back.meta == [
        {"flaw": "spurious", "score": 0.5, "box": [1, 2, 3]},
        {"n": 3},  # the 2-d mask is dropped
        {},
        {"nested": {"t": [1, 2]}},
    ]
    # a manifest's fingerprint follows its files' bytes: stable across loads
    assert load_manifest(out).fingerprint() == back.fingerprint()
    # Images sit beside the manifest under relative paths, and no temp file is left behind.
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(
        not Path(r["image"]).is_absolute() and r["image"].startswith("images/") for r in records
    )
    assert records[2]["label"] is None and records[0]["label"] == "circle"
    assert len({r["image"].lower() for r in records}) == 4  # "s0" and "S0" do not collide
    leftovers = [p for p in (tmp_path / "export").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_write_manifest_rejects_bad_input(tmp_path):
    ds = make_dataset()
    with pytest.raises(ValueError, match="JSONL"):
        write_manifest(ds, tmp_path / "m.csv")
    with pytest.raises(ValueError, match="image_dir"):
        write_manifest(ds, tmp_path / "m.jsonl", image_dir="../out")
    with pytest.raises(ValueError, match="no rows"):
        write_manifest(ds.subset([]), tmp_path / "m.jsonl")
    ds.modalities["image"][0] = ds.modalities["image"][0].astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        write_manifest(ds, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_write_text_only_unlabelled_dataset(tmp_path):
    ds = Dataset(
        name="t", ids=["a", "b"], modalities={"text": ["x", "y"]}, labels=[-1, -1], classes=[]
    )
    (tmp_path / "m.classes.txt").write_text("stale\n")
    out = write_manifest(ds, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.classes.txt").exists() and not (tmp_path / "images").exists()
    back = load_manifest(out)
    assert back.ids == ["a", "b"] and back.labels.tolist() == [-1, -1] and back.classes == []
    assert back.fingerprint() == ds.fingerprint()
