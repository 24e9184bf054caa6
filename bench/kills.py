"""Kills: SIGKILL a quick audit at seeded random moments; each resumed run writes the same card.

The audit (the real CLI in a subprocess: tiny-clip quick on ``shapes:n=900``, eight checks) is
first run whole. Then chains of interrupted runs start on a fresh report folder: each attempt
resumes the folder and is killed after a delay drawn from ``rng.uniform(lo, hi)`` seconds
(``hi`` defaults to the whole run's time), until an attempt finishes on its own; a new chain
starts until ``--kills`` kills have landed. Every finished chain must write the uninterrupted
run's card (outside ``timings`` and ``environment``), leave no temporary file, and every JSON
file in its folder must parse. Exits 1 on any difference.

    .venv/bin/python bench/kills.py [--kills 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mmsafe.audit import STATE_DIR
from mmsafe.report.card import without_run_sections

WORLD = "shapes:n=900"
CHECKS = (
    "performance.classification,monitoring.calibration,monitoring.conformal,monitoring.ood,"
    "monitoring.slices,monitoring.uncertainty,controllability.fairness,efficiency.profile"
)
OPTIONS = {
    "monitoring.uncertainty": {"n_passes": 4},
    "efficiency.profile": {"batch_sizes": [1, 4], "repeats": 1, "warmup": 0},
}


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "mmsafe", "audit", "--model", "tiny-clip", "--data", WORLD,
            "--quick", "--checks", CHECKS, "--options", json.dumps(OPTIONS), "--seed", "0",
            "--out", str(out)]  # fmt: skip


def _stable(out: Path) -> str:
    card = json.loads((out / "card.json").read_text("utf-8"))
    return json.dumps(without_run_sections(card), indent=2, allow_nan=False)


def _problems(out: Path) -> list[str]:
    """Temporary files left, or JSON files that do not parse."""
    bad = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp")]
    for p in out.rglob("*.json"):
        try:
            json.loads(p.read_text("utf-8"))
        except (ValueError, UnicodeDecodeError):
            bad.append(f"{p.relative_to(out)} (does not parse)")
    return bad


def _finished(out: Path) -> int:
    folder = out / STATE_DIR / "checks"
    return len(list(folder.glob("[!.]*.json"))) if folder.exists() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lo", type=float, default=1.0, help="shortest delay before a kill (s)")
    ap.add_argument("--hi", type=float, default=None, help="longest delay (default: whole run)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        subprocess.run(_cmd(root / "whole"), env=env, check=True, capture_output=True)
        whole_s = time.perf_counter() - t0
        reference = _stable(root / "whole")
        hi = args.hi or whole_s
        print(f"uninterrupted run: {whole_s:.1f} s; kills after U({args.lo:g}, {hi:.1f}) s")
        kills, chains, failures = 0, 0, []
        while kills < args.kills:
            chains += 1
            out = root / f"chain{chains}"
            attempts = []
            while True:
                delay = float(rng.uniform(args.lo, hi)) if kills < args.kills else None
                proc = subprocess.Popen(_cmd(out), env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)  # fmt: skip
                try:
                    rc = proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    attempts.append(f"killed at {delay:.1f} s ({_finished(out)} checks saved)")
                    continue
                attempts.append(f"finished (exit {rc})")
                break
            same = rc == 0 and _stable(out) == reference
            problems = _problems(out)
            status = "identical" if same and not problems else f"DIFFERS {problems}"
            print(f"chain {chains}: {'; '.join(attempts)} -> {status}")
            if status != "identical":
                failures.append(chains)
        print(f"{kills} kills over {chains} chains: {chains - len(failures)} identical cards")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
