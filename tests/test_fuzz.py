"""Fuzzing the parsers of user input: only the documented user errors may come out.

Each target takes what a user types or writes (a manifest file, a ``--data`` spec, ``--options``
JSON, a ``--fail-on`` gate, a card given to ``mmsafe compare``) and must either work or raise the
error the CLI turns into exit 2. Anything else (``TypeError``, ``RecursionError``,
``OverflowError``...) would be an internal crash, exit 3. A crash the fuzzer found is kept as an
``@example``.
"""

from __future__ import annotations

import copy
import json
import math
import string
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import mmsafe.checks  # noqa: F401 - registers the checks
from mmsafe.checks.registry import CheckSelectionError, parse_check_options
from mmsafe.data.loading import DataSpecError, load_data
from mmsafe.data.manifest import ManifestError, load_manifest
from mmsafe.data.rec_formats import is_rec_spec
from mmsafe.data.worlds import WORLDS, WorldSpecError, is_world_spec, load_world
from mmsafe.data.worlds.shapes import parse_world_spec
from mmsafe.data.worlds.shapes_gen import parse_shapes_gen_spec
from mmsafe.data.worlds.shapes_rec import parse_shapes_rec_spec
from mmsafe.data.worlds.shapes_vqa import parse_shapes_vqa_spec
from mmsafe.data.worlds.spec import MAX_LAZY_ROWS, knob_types
from mmsafe.report.compare import CardFormatError, Delta, compare_cards
from mmsafe.report.gates import Gate, GateOutcome, GateSyntaxError, evaluate_gates, parse_gate

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# ------------------------------------------------------------------------------------------
# Manifests: random bytes and near-valid rows, as .jsonl and .csv files
# ------------------------------------------------------------------------------------------

COLUMNS = ["id", "text", "image", "label", "group", "split", "meta", "caption", ""]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
rows = st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=6)
jsonl_lines = st.lists(
    st.one_of(
        rows.map(json.dumps),
        st.text(max_size=40),
        st.sampled_from(["[1]", "NaN", '{"id": 1', '{"id": "a", "text": "t"} x', "\ufeff{}"]),
    ),
    max_size=6,
)
csv_cells = st.one_of(
    st.text(alphabet=string.printable + "é\x00\ufeff", max_size=12),
    st.sampled_from(['"', '""', "a,b", '"a,b"', "{", '{"k": 1}', "[1]", "-1", "3", "nan"]),
)
csv_files = st.builds(
    lambda header, body: "\n".join(",".join(r) for r in [header, *body]),
    st.lists(st.sampled_from(COLUMNS), min_size=0, max_size=5),
    st.lists(st.lists(csv_cells, max_size=6), max_size=5),
)


def _load_file(name: str, data: bytes) -> None:
    """Load ``data`` written as ``name`` in a fresh folder; only ManifestError may escape."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-miss column names warn; that is not a failure
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            ds = load_manifest(path)
        except ManifestError as err:
            assert str(err).strip(), "a ManifestError must say what is wrong"
            return
        assert len(ds) >= 1
        assert len(ds.ids) == len(set(ds.ids)) == len(ds.labels)


@FUZZ
@given(st.binary(max_size=300))
@example(b'{"id": "a", "text": "t", "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}\n")
@example(b'{"id": "a", "text": "t", "label": ' + b"9" * 5000 + b"}\n")
def test_fuzz_jsonl_bytes(data: bytes) -> None:
    _load_file("m.jsonl", data)


@FUZZ
@given(jsonl_lines)
def test_fuzz_jsonl_rows(lines: list[str]) -> None:
    _load_file("m.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=300))
@example(b"id,text,meta\na,t," + b"[" * 5000 + b"]" * 5000 + b"\n")
@example(b"id,text,meta\na,t," + b"9" * 5000 + b"\n")
def test_fuzz_csv_bytes(data: bytes) -> None:
    _load_file("m.csv", data)


@FUZZ
@given(csv_files)
def test_fuzz_csv_rows(text: str) -> None:
    _load_file("m.csv", text.encode("utf-8", "surrogatepass"))


# ------------------------------------------------------------------------------------------
# --data specs: world knobs (parsed and validated, never generated) and other strings
# ------------------------------------------------------------------------------------------

PARSERS = {
    "shapes": parse_world_spec,
    "shapes-gen": parse_shapes_gen_spec,
    "shapes-rec": parse_shapes_rec_spec,
    "shapes-vqa": parse_shapes_vqa_spec,
}
KNOBS = sorted({k for p in PARSERS for k in knob_types(type(PARSERS[p](p)))} | {"bogus", ""})
knob_values = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["1" * 400, "-" + "1" * 400, "1e309", "0x10", "1_000", "٣", "", " "]),
    st.text(alphabet=string.printable, max_size=6),
)
pairs = st.tuples(st.sampled_from(KNOBS), st.sampled_from(["=", "==", ":", ""]), knob_values).map(
    "".join
)
world_specs = st.builds(
    lambda name, sep, ps: name + sep + ",".join(ps),
    st.sampled_from([*PARSERS, "digits", "shape", " shapes ", ""]),
    st.sampled_from([":", "", "::"]),
    st.lists(pairs, max_size=4),
)


@FUZZ
@given(world_specs)
@example("shapes:n=" + "1" * 400)  # was OverflowError (n * train_frac), exit 3
@example("shapes-rec:seed=" + "1" * 400)  # was OverflowError (math.isfinite of a huge int)
@example("shapes:n=100000000000")  # was a MemoryError (745 GiB), exit 3
def test_fuzz_world_spec(spec: str) -> None:
    name = spec.strip().partition(":")[0].strip()
    try:
        if name in PARSERS:
            config = PARSERS[name](spec)  # validates every knob; generates nothing
            assert is_world_spec(spec)
            assert all(abs(v) < 10**18 for v in vars(config).values() if isinstance(v, int))
            # a valid spec never asks for more rows than a generated world holds
            sizes = [getattr(config, k, 0) for k in ("n", "n_users", "n_images", "n_scenes")]
            assert max(sizes) <= MAX_LAZY_ROWS
        elif name not in WORLDS:
            load_world(spec)  # an unknown world fails before any generation
            raise AssertionError(f"load_world accepted an unknown world: {spec!r}")
    except WorldSpecError as err:
        assert str(err).strip()


@FUZZ
@given(st.text(max_size=30))
def test_fuzz_data_spec_that_is_no_world(spec: str) -> None:
    if is_world_spec(spec) or is_rec_spec(spec):  # those generate or read folders
        return
    try:
        load_data(spec)
    except (DataSpecError, ManifestError, WorldSpecError) as err:
        assert str(err).strip()


# ------------------------------------------------------------------------------------------
# --options JSON
# ------------------------------------------------------------------------------------------

CHECK_NAMES = ["calibration", "monitoring.calibration", "performance", "nope", "robustness.*"]
options_docs = st.one_of(
    st.text(max_size=40),
    st.dictionaries(
        st.sampled_from(CHECK_NAMES),
        st.one_of(
            st.dictionaries(st.sampled_from(["n_bins", "n_boot", "bins", ""]), json_values),
            json_values,
        ),
        max_size=3,
    ).map(json.dumps),
    json_values.map(json.dumps),
)


@FUZZ
@given(options_docs)
@example('{"calibration": {"n_bins": ' + "9" * 5000 + "}}")  # was ValueError, exit 3
@example("[" * 5000 + "]" * 5000)  # was RecursionError, exit 3
def test_fuzz_check_options(text: str) -> None:
    try:
        parsed = parse_check_options(text)
    except CheckSelectionError as err:
        assert str(err).startswith("--options")
        return
    assert isinstance(parsed, dict)
    assert all(isinstance(v, dict) for v in parsed.values())


# ------------------------------------------------------------------------------------------
# --fail-on gates, parsed and evaluated on a small card
# ------------------------------------------------------------------------------------------


def _metric(value: Any) -> dict[str, Any]:
    return {"value": value, "ci": None}


SMALL_CARD = {
    "checks": {
        "monitoring.calibration": {
            "status": "ok",
            "reason": None,
            "metrics": {"ece": _metric(0.1), "nan_metric": _metric(float("nan"))},
        },
        "performance.classification": {
            "status": "ok",
            "reason": None,
            "metrics": {"accuracy": _metric(0.8), "none_metric": _metric(None)},
        },
        "robustness.shift": {"status": "skipped", "reason": "needs shift", "metrics": {}},
    },
    "timings": {"checks": {"monitoring.calibration": {"metrics": {"seconds": _metric(2.0)}}}},
}
targets = st.sampled_from(
    [
        "calibration.ece",
        "monitoring.calibration.ece",
        "monitoring.calibration.nan_metric",
        "monitoring.calibration.seconds",
        "performance.accuracy",
        "performance.none_metric",
        "robustness.shift.x",
        "nothing.here",
        "a",
        "",
    ]
)
gate_texts = st.one_of(
    st.text(max_size=30),
    st.tuples(
        targets,
        st.sampled_from(["<", "<=", ">", ">=", "==", "!=", "=>", "=", " < "]),
        st.one_of(st.floats().map(repr), st.sampled_from(["nan", "-inf", "x", "1e999", ""])),
    ).map("".join),
)


@FUZZ
@given(gate_texts)
@example("calibration.ece>nan")  # was accepted: a gate that never fails
@example("calibration.ece<1e999")
def test_fuzz_gates(text: str) -> None:
    try:
        gate = parse_gate(text)
    except GateSyntaxError as err:
        assert text in str(err) or repr(text) in str(err)
        return
    assert isinstance(gate, Gate) and math.isfinite(gate.threshold)
    (outcome,) = evaluate_gates([gate], SMALL_CARD)
    assert isinstance(outcome, GateOutcome) and isinstance(outcome.failed, bool)
    if outcome.value is None:
        assert outcome.failed, outcome  # a gate that cannot be evaluated fails, never passes
    else:
        assert math.isfinite(outcome.value)


# ------------------------------------------------------------------------------------------
# mmsafe compare on edited cards
# ------------------------------------------------------------------------------------------


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a nest of dicts and lists."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def edited_cards(draw: st.DrawFn) -> dict[str, Any]:
    card = copy.deepcopy(SMALL_CARD)
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(card)
        path = draw(st.sampled_from(paths))
        if not path:
            continue
        parent = card
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return card


@FUZZ
@given(edited_cards(), st.booleans())
@example(
    {"checks": {"monitoring.calibration": {"status": "ok", "metrics": {"ece": _metric("x")}}}},
    True,
)  # was ValueError from float("x")
@example({"checks": {"monitoring.calibration": {"status": "ok", "metrics": []}}}, False)
@example({"checks": []}, True)  # were AttributeErrors
def test_fuzz_compare_cards(card: dict[str, Any], edited_first: bool) -> None:
    before, after = (card, SMALL_CARD) if edited_first else (SMALL_CARD, card)
    try:
        deltas = compare_cards(before, after)
    except CardFormatError as err:
        assert "card" in str(err)
        return
    assert all(isinstance(d, Delta) for d in deltas)
    assert all(math.isfinite(d.before) and math.isfinite(d.after) for d in deltas)
    assert len({d.metric for d in deltas}) == len(deltas)


def test_compare_skips_nan_and_reports_the_rest() -> None:
    """NaN is not a finite metric: it is left out; a finite one in both cards is compared."""
    after = copy.deepcopy(SMALL_CARD)
    after["checks"]["monitoring.calibration"]["metrics"]["ece"]["value"] = 0.05
    deltas = compare_cards(SMALL_CARD, after)
    assert [d.metric for d in deltas] == [
        "monitoring.calibration.ece",
        "performance.classification.accuracy",
    ]
    assert deltas[0].improved is True and math.isclose(deltas[0].delta, -0.05)
