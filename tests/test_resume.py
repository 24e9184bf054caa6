"""Same seed, same card; a resumed audit writes the card an uninterrupted one writes.

Both run the real CLI in subprocesses (``python -m mmsafe``), so nothing shared inside one
Python process (caches, hash seeds, torch state) can hide a difference. Cards are compared as
JSON text outside the sections that vary run to run (``timings``, ``environment``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mmsafe
from mmsafe.audit import STATE_DIR
from mmsafe.report.card import RUN_SECTIONS, without_run_sections

pytestmark = pytest.mark.slow

WORLD = "shapes:n=900"  # the world of `mmsafe demo --quick`
# Eight checks that each take a moment (the kill lands between or inside them) and together
# cover metrics with CIs, plots, findings, skipped-free results and efficiency.profile timings.
CHECKS = (
    "performance.classification,monitoring.calibration,monitoring.conformal,monitoring.ood,"
    "monitoring.slices,"
    "monitoring.uncertainty,controllability.fairness,efficiency.profile"
)
OPTIONS = {
    "monitoring.uncertainty": {"n_passes": 4},
    "efficiency.profile": {"batch_sizes": [1, 4], "repeats": 1, "warmup": 0},
}
TIMEOUT = 1800  # a guard against a hung subprocess, not an assertion on speed


@pytest.fixture(scope="module")
def demo_env(mmsafe_cache) -> dict[str, str]:
    """The environment of the subprocesses, with the quick tiny-clip trained (once) in the cache."""
    from mmsafe.data.loading import load_data
    from mmsafe.models.loading import load_model

    load_model(
        "tiny-clip", data=load_data(WORLD), quick=True, cache_dir=mmsafe_cache, progress=False
    )
    src = str(Path(mmsafe.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": src if not path else f"{src}{os.pathsep}{path}",
        "MMSAFE_CACHE_DIR": str(mmsafe_cache),
    }


def _audit_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mmsafe",
        "audit",
        "--model",
        "tiny-clip",
        "--data",
        WORLD,
        "--quick",
        "--checks",
        CHECKS,
        "--options",
        json.dumps(OPTIONS),
        "--seed",
        "0",
        "--out",
        str(out),
    ]


def _start(cmd: list[str], env: dict[str, str], log: Path, **kw: Any) -> subprocess.Popen:
    with log.open("ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, **kw)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    rc = proc.wait(timeout=TIMEOUT)
    assert rc == 0, f"exit {rc}; output:\n{log.read_text(errors='replace')[-4000:]}"


def _stable_text(out: Path) -> str:
    """``card.json`` as JSON text, without ``timings`` and ``environment``."""
    card = json.loads((out / "card.json").read_text("utf-8"))
    assert set(RUN_SECTIONS) <= set(card)  # the sections are there, and only they are dropped
    return json.dumps(without_run_sections(card), indent=2, allow_nan=False)


def _finished(out: Path) -> list[str]:
    """Check results saved so far (finished writes only: temporary files start with a dot)."""
    folder = out / STATE_DIR / "checks"
    return sorted(p.stem for p in folder.glob("[!.]*.json")) if folder.exists() else []


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp"))


def test_two_same_seed_quick_demos_write_the_same_card(demo_env, tmp_path):
    """`mmsafe demo --quick` twice (in parallel, different hash seeds): the same bytes."""
    runs = []
    for i in (1, 2):
        env = {**demo_env, "PYTHONHASHSEED": str(i)}
        cmd = [sys.executable, "-m", "mmsafe", "demo", "--quick", "--out", str(tmp_path / f"r{i}")]
        runs.append((_start(cmd, env, tmp_path / f"r{i}.log"), tmp_path / f"r{i}.log"))
    for proc, log in runs:
        _finish(proc, log)
    first, second = (_stable_text(tmp_path / f"r{i}") for i in (1, 2))
    card = json.loads(first)
    assert len(card["checks"]) >= 14 and card["checks"]["efficiency.profile"]["status"] == "ok"
    if first != second:  # name the checks that differ before the full diff
        other = json.loads(second)
        diff = [k for k in card["checks"] if card["checks"][k] != other["checks"].get(k)]
        pytest.fail(f"cards differ outside timings/environment in checks {diff}")
    assert first == second


def test_a_resumed_audit_writes_the_uninterrupted_card(demo_env, tmp_path):
    """SIGKILL an audit after its 1st, 3rd and 6th saved check, resume it, compare the cards."""
    whole = tmp_path / "whole"
    log = tmp_path / "whole.log"
    _finish(_start(_audit_cmd(whole), demo_env, log), log)
    n_checks = len(CHECKS.split(","))
    assert _finished(whole) == sorted(CHECKS.split(","))

    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    killed_at = []
    for n in (1, 3, 6):
        proc = _start(_audit_cmd(out), demo_env, log)
        while len(_finished(out)) < n and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGKILL, "the audit ended before it could be killed"
        killed_at.append(_finished(out))
        assert not (out / "card.json").exists()  # no card until every check has finished
    assert [len(k) >= n for k, n in zip(killed_at, (1, 3, 6), strict=True)] == [True] * 3
    assert len(killed_at[-1]) < n_checks

    _finish(_start(_audit_cmd(out), demo_env, log), log)
    card = json.loads((out / "card.json").read_text("utf-8"))
    assert sorted(card["timings"]["reused"]) == killed_at[-1]  # it did resume
    assert _stable_text(out) == _stable_text(whole)
    assert _leftovers(out) == [] and _leftovers(whole) == []
