"""Loaders for real recommendation data: IISAN TSV folders and MMRec atomic files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsafe.data.loading import load_data
from mmsafe.data.manifest import ManifestError
from mmsafe.data.rec_formats import is_rec_spec, load_iisan, load_mmrec

ITEMS = {"i1": "red mug", "i2": "blue cup", "i3": "green teapot", "i4": "saucer"}


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _iisan(tmp_path: Path, users: str | None = None, images: bool = True) -> Path:
    folder = tmp_path / "Mugs"
    _write(folder / "items.tsv", "".join(f"{k}\t{v}\n" for k, v in ITEMS.items()))
    if users is None:
        users = "u1\ti1 i2 i3 i4\nu2\ti4 i4 i1\nu3\ti2 i3\n"
    _write(folder / "users.tsv", users)
    if images:
        (folder / "images").mkdir()
        for n, item in enumerate(ITEMS):
            Image.fromarray(_image(n)).save(folder / "images" / f"{item}.png")
    return folder


def _seq(ds) -> list[list[int]]:
    return [s.tolist() for s in ds.modalities["sequence"]]


# --------------------------------------------------------------------------------- IISAN


def test_iisan_round_trip(tmp_path):
    folder = _iisan(tmp_path)
    ds = load_data(f"iisan:{folder}")
    assert ds.name == "Mugs" and ds.source == f"iisan:{folder.resolve()}"
    assert ds.ids == ["u1", "u2"]
    assert ds.classes == ["i1", "i2", "i3", "i4"] == ds.catalog.ids
    assert _seq(ds) == [[0, 1, 2], [3, 3]]
    assert ds.labels.tolist() == [3, 0]
    assert all(s.dtype == np.int64 for s in ds.modalities["sequence"])
    assert ds.groups is None and ds.splits is None
    cat = ds.catalog
    assert cat.modalities["text"] == list(ITEMS.values())
    assert cat.labels.tolist() == [-1] * 4
    for n in range(4):
        np.testing.assert_array_equal(cat.modalities["image"][n], _image(n))
    assert [(s.row, s.id) for s in ds.skipped] == [(3, "u3")]
    assert "2 interactions" in ds.skipped[0].reason
    assert load_data(f"iisan:{folder}").fingerprint() == ds.fingerprint()


def test_iisan_original_file_names_and_quoted_titles(tmp_path):
    folder = tmp_path / "Instrument"
    _write(
        folder / "Musical_Instruments_items.tsv",
        'B01\t Folk Dulcimer Plans\nB02\t"Zildjian K 20"" Ride"\nB03\tUSB Mic\n',
    )
    _write(folder / "am_Musical_Instruments_users_10K.tsv", "A1\tB01 B02 B03 B02\n")
    (folder / "am_image_mi").mkdir()
    for n, item in enumerate(("B01", "B02", "B03")):
        Image.fromarray(_image(n)).save(folder / "am_image_mi" / f"{item}.jpg", quality=95)
    ds = load_iisan(folder)
    assert ds.catalog.modalities["text"] == [
        "Folk Dulcimer Plans",
        'Zildjian K 20" Ride',
        "USB Mic",
    ]
    assert _seq(ds) == [[0, 1, 2]] and ds.labels.tolist() == [1]
    assert ds.catalog.modalities["image"][0].shape == (6, 5, 3)


def test_iisan_without_images_and_with_header_lines(tmp_path):
    folder = tmp_path / "d"
    _write(folder / "items.tsv", "item_id\ttitle\na\tA\nb\tB\n")
    _write(folder / "users.tsv", "user_id\titems\nx\ta b a\n")
    ds = load_iisan(folder)
    assert ds.catalog.modality_names == ("text",)
    assert ds.classes == ["a", "b"] and _seq(ds) == [[0, 1]] and ds.labels.tolist() == [0]


def test_iisan_unknown_item_names_file_line_field_and_id(tmp_path):
    folder = _iisan(tmp_path, users="u1\ti1 i2 i3\nu2\ti1 zz i2\n")
    with pytest.raises(ManifestError) as info:
        load_iisan(folder)
    text = str(info.value)
    assert "users.tsv" in text and "line 2 (user 'u2'), field 'items'" in text
    assert "unknown item id 'zz'" in text and "--skip-invalid" in text
    assert [(p.row, p.field, p.id) for p in info.value.problems] == [(2, "items", "u2")]


def test_iisan_skip_invalid_drops_and_records_bad_lines(tmp_path):
    users = "u1\ti1 i2 i3\nu2\ti1 zz i2\nu1\ti1 i2 i4\nno tab here\n"
    ds = load_iisan(_iisan(tmp_path, users=users), skip_invalid=True)
    assert ds.ids == ["u1"] and _seq(ds) == [[0, 1]]
    assert [(s.row, s.field) for s in ds.skipped] == [(2, "items"), (3, "user"), (4, "(row)")]
    assert "duplicate user id 'u1' (first on line 1)" in ds.skipped[1].reason


@pytest.mark.parametrize(
    ("users", "needle"),
    [
        ("u1 i1 i2 i3\n", "line 1, field '(row)': malformed line: 1 tab-separated field"),
        ("u1\ti1 i2 i3\nu1\ti2 i3 i4\n", "line 2 (user 'u1'), field 'user': duplicate user id"),
        ("\ti1 i2 i3\n", "line 1, field 'user': empty user id"),
        ("u1\t \n", "line 1 (user 'u1'), field 'items': no item ids"),
        ("\n\n", "empty file"),
        ("u1\ti1 i2\n", "no user has 3 or more interactions"),
    ],
)
def test_iisan_bad_user_files(tmp_path, users, needle):
    with pytest.raises(ManifestError, match="users.tsv") as info:
        load_iisan(_iisan(tmp_path, users=users, images=False))
    assert needle in str(info.value)


def test_iisan_bad_item_file(tmp_path):
    folder = _iisan(tmp_path, images=False)
    _write(folder / "items.tsv", "i1\tred mug\ni1\tagain\ni2\t \ni3\n")
    with pytest.raises(ManifestError) as info:
        load_iisan(folder)
    text = str(info.value)
    assert "items.tsv" in text
    assert "line 2 (item 'i1'), field 'item': duplicate item id 'i1' (first on line 1)" in text
    assert "line 3 (item 'i2'), field 'title': empty title" in text
    assert "line 4, field '(row)': malformed line: 1 tab-separated field, expected 2" in text


def test_iisan_missing_folder_and_files(tmp_path):
    with pytest.raises(ManifestError, match="folder not found"):
        load_data(f"iisan:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"no user sequence file \(expected users.tsv"):
        load_iisan(tmp_path / "empty")
    _write(tmp_path / "empty" / "users.tsv", "u\ta b c\n")
    with pytest.raises(ManifestError, match="no item file"):
        load_iisan(tmp_path / "empty")
    with pytest.raises(ManifestError, match="must be a folder"):
        load_iisan(tmp_path / "empty" / "users.tsv")


def test_iisan_bad_and_missing_images(tmp_path):
    folder = _iisan(tmp_path)
    (folder / "images" / "i2.png").write_bytes(b"not a png")
    (folder / "images" / "i4.png").unlink()
    with pytest.raises(ManifestError) as info:
        load_iisan(folder)
    text = str(info.value)
    assert "2 invalid items in" in text and "images" in text
    assert "item #2 (id 'i2'), field 'image': unreadable image: i2.png" in text
    assert "item #4 (id 'i4'), field 'image': no image file images/i4.(jpg" in text
    assert {p.field for p in info.value.problems} == {"image"}


# --------------------------------------------------------------------------------- MMRec


def _mmrec(tmp_path: Path, inter: str, features: bool = True) -> Path:
    folder = tmp_path / "baby"
    _write(folder / "baby.inter", inter)
    if features:
        np.save(folder / "image_feat.npy", np.arange(12, dtype=np.float64).reshape(4, 3))
        np.save(folder / "text_feat.npy", np.ones((4, 2), dtype=np.float32))
    return folder


INTER = (
    "userID:token\titemID:token\trating:float\ttimestamp:float\n"
    "7\t2\t5.0\t300\n"
    "7\t0\t4.0\t100\n"
    "8\t1\t5.0\t10\n"
    "7\t3\t3.0\t200\n"
    "8\t2\t1.0\t30\n"
    "8\t3\t2.0\t20\n"
    "9\t1\t2.0\t5\n"
)


def test_mmrec_round_trip_orders_by_timestamp(tmp_path):
    folder = _mmrec(tmp_path, INTER)
    item = "item_id:token\ttitle:token_seq\tbrand:token\n"
    item += "0\tbottle\tacme\n1\tbib\t\n2\tspoon\tacme\n3\tcot\tzed\n"
    _write(folder / "baby.item", item)
    ds = load_data(f"mmrec:{folder}")
    assert ds.name == "baby" and ds.source == f"mmrec:{folder.resolve()}"
    assert ds.ids == ["7", "8"] and ds.classes == ["0", "1", "2", "3"]
    assert _seq(ds) == [[0, 3], [1, 3]] and ds.labels.tolist() == [2, 2]
    assert ds.meta[0] == {"timestamps": [100.0, 200.0, 300.0]}
    assert [(s.row, s.id) for s in ds.skipped] == [(8, "9")]
    cat = ds.catalog
    assert cat.modalities["text"] == ["bottle", "bib", "spoon", "cot"]
    assert cat.meta[0] == {"brand": "acme"} and cat.meta[1] == {}
    feats = cat.modalities["image_features"]
    assert feats[1].dtype == np.float32 and feats[1].tolist() == [3.0, 4.0, 5.0]
    assert cat.modalities["text_features"][3].shape == (2,)


def test_mmrec_plain_header_without_timestamp_keeps_file_order(tmp_path):
    inter = "userID\titemID\tx_label\n1\t3\t0\n1\t0\t0\n1\t2\t2\n"
    ds = load_mmrec(_mmrec(tmp_path, inter))
    assert _seq(ds) == [[3, 0]] and ds.labels.tolist() == [2] and ds.meta == [{}]


def test_mmrec_images_and_titles_without_features(tmp_path):
    folder = _mmrec(tmp_path, "user_id\titem_id\ttimestamp\nu\tb\t2\nu\ta\t1\nu\tc\t3\n", False)
    _write(folder / "titles.tsv", "a\tA\nb\tB\nc\tC\n")
    (folder / "images").mkdir()
    for n, item in enumerate("abc"):
        Image.fromarray(_image(n)).save(folder / "images" / f"{item}.png")
    ds = load_mmrec(folder)
    assert ds.classes == ["a", "b", "c"] and _seq(ds) == [[0, 1]] and ds.labels.tolist() == [2]
    assert ds.catalog.modality_names == ("text", "image")
    np.testing.assert_array_equal(ds.catalog.modalities["image"][2], _image(2))


def test_mmrec_images_only_catalog_sorted_by_id(tmp_path):
    folder = _mmrec(tmp_path, "userID\titemID\n1\t10\n1\t2\n1\t9\n", features=False)
    (folder / "images").mkdir()
    for n, item in enumerate(("10", "2", "9")):
        Image.fromarray(_image(n)).save(folder / "images" / f"{item}.png")
    ds = load_mmrec(folder)
    assert ds.classes == ["2", "9", "10"] and _seq(ds) == [[2, 0]] and ds.labels.tolist() == [1]


@pytest.mark.parametrize(
    ("inter", "needle"),
    [
        ("user\tbogus\n1\t2\n", "line 1, field 'item': missing the item column"),
        ("itemID\n1\n", "line 1, field 'user': missing the user column"),
        ("userID\titemID\ttimestamp\n1\t2\tyesterday\n", "line 2 (user '1'), field 'timestamp'"),
        ("userID\titemID\ttimestamp\n1\t2\tnan\n", "timestamp must be a finite number"),
        ("userID\titemID\n1\t9\n", "line 2 (user '1'), field 'itemID': unknown item id '9'"),
        ("userID\titemID\n1\t2\t3\n", "line 2 (user '1'), field '(row)': malformed line"),
        ("userID\titemID\n\t2\n", "line 2, field 'userID': empty user id"),
        ("userID\titemID\n", "no interactions (only the header line)"),
        ("", "empty file"),
    ],
)
def test_mmrec_bad_inter_files(tmp_path, inter, needle):
    with pytest.raises(ManifestError, match=r"baby\.inter") as info:
        load_mmrec(_mmrec(tmp_path, inter))
    assert needle in str(info.value)


def test_mmrec_skip_invalid_drops_interaction_lines(tmp_path):
    inter = "userID\titemID\ttimestamp\n1\t0\t1\n1\t9\t2\n1\t1\t3\n1\t2\tlater\n1\t3\t4\n"
    ds = load_mmrec(_mmrec(tmp_path, inter), skip_invalid=True)
    assert _seq(ds) == [[0, 1]] and ds.labels.tolist() == [3]
    assert [(s.row, s.field) for s in ds.skipped] == [(3, "itemID"), (5, "timestamp")]


def test_mmrec_folder_problems(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(ManifestError, match=r"no \.inter file"):
        load_mmrec(tmp_path / "none")
    folder = _mmrec(tmp_path, INTER, features=False)
    with pytest.raises(ManifestError, match="no item modality found"):
        load_mmrec(folder)
    np.save(folder / "image_feat.npy", np.zeros((4, 3)))
    np.save(folder / "text_feat.npy", np.zeros((5, 3)))
    with pytest.raises(ManifestError, match="disagree on the number of items"):
        load_mmrec(folder)
    np.save(folder / "text_feat.npy", np.full((4, 3), np.nan))
    with pytest.raises(ManifestError, match=r"text_feat\.npy: NaN"):
        load_mmrec(folder)
    (folder / "text_feat.npy").unlink()
    _write(folder / "titles.tsv", "0\ta\n1\tb\n3\td\n")
    with pytest.raises(ManifestError, match=r"item #3 \(id '2'\), field 'title': no title"):
        load_mmrec(folder)
    _write(folder / "other.inter", "userID\titemID\n")
    with pytest.raises(ManifestError, match=r"several \.inter files"):
        load_mmrec(folder)


def test_rec_spec_detection_and_unknown_prefix():
    assert is_rec_spec("mmrec:/data/baby") and is_rec_spec("IISAN:x")
    assert not is_rec_spec("shapes-rec:seed=1") and not is_rec_spec("data/x.jsonl")
    with pytest.raises(ManifestError, match="names no folder"):
        load_data("mmrec:")
