"""Split conformal: mmsafe vs MAPIE on the same precomputed probabilities, in one process.

For N in (10^5, 10^6) calibration rows and as many test rows, 10 classes (Dirichlet(0.4)
"model" probabilities; labels drawn from a sharper distribution), each side fits its threshold
on the calibration rows and predicts sets for the test rows:

* ``lac``: both sides are deterministic; the sets must be identical.
* ``aps``: MAPIE's default (randomized calibration scores) with ``include_last_label=
  "randomized"`` vs mmsafe ``randomized=True``: different uniforms, so coverage and set size
  agree statistically.
* ``raps``: MAPIE also tunes ``k_reg`` / ``lambda`` on part of the calibration rows (that search
  is inside its timing); mmsafe then runs with MAPIE's chosen values, randomized, on the rest.

Timings alternate the two sides; the headline is the median of per-pair time ratios
(mmsafe / MAPIE). Goal: <= 1x.

    .venv/bin/python bench/conformal.py [--sizes 100000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from mmsafe.methods.conformal import ConformalPredictor, set_coverage, set_sizes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the MAPIE wrapper lives in tests/
from tests.mapie_reference import mapie_sets  # noqa: E402

warnings.filterwarnings("ignore")


def make_data(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(c, 0.4), size=n)
    truth = probs**2 / (probs**2).sum(1, keepdims=True)
    labels = np.minimum((truth.cumsum(1) < rng.uniform(size=(n, 1))).sum(1), c - 1)
    return probs, labels


def run_mapie(score, probs, labels, cal, test, level):
    t = time.perf_counter()
    run = mapie_sets(score, probs, labels, cal, test, level, randomized=True)
    return run, time.perf_counter() - t


def run_mmsafe(score, probs, labels, test, level, run):
    t = time.perf_counter()
    cp = ConformalPredictor(level, score=score, randomized=score != "lac", **run.kw)
    sets = cp.fit(probs[run.rows], labels[run.rows]).predict_set(probs[test])
    return sets, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--level", type=float, default=0.9)
    args = ap.parse_args()
    import mapie

    print(f"python {platform.python_version()}, numpy {np.__version__}, MAPIE {mapie.__version__}")
    print(f"{platform.processor() or platform.machine()}; level {args.level}; C={args.classes}")
    header = (
        f"{'N cal+test':>12} {'score':>5} {'cov mmsafe':>10} {'cov MAPIE':>10} {'Δcov pp':>8} "
        f"{'size mmsafe':>11} {'size MAPIE':>10} {'t mmsafe':>9} {'t MAPIE':>8} {'ratio':>6} "
        "identical"
    )
    print(header)
    for n in args.sizes:
        probs, labels = make_data(2 * n, args.classes, seed=n)
        cal, test = np.arange(n), np.arange(n, 2 * n)
        for score in ("lac", "aps", "raps"):
            t_m, t_p, ratios = [], [], []
            for _ in range(args.repeats):
                run, s_p = run_mapie(score, probs, labels, cal, test, args.level)
                ours, s_m = run_mmsafe(score, probs, labels, test, args.level, run)
                t_m.append(s_m)
                t_p.append(s_p)
                ratios.append(s_m / s_p)
            cov_o = set_coverage(ours, labels[test]).mean()
            theirs = run.sets
            cov_t = set_coverage(theirs, labels[test]).mean()
            same = "yes" if np.array_equal(ours, theirs) else "no (randomized)"
            print(
                f"{n:>6}+{n:<5} {score:>5} {cov_o:>10.4f} {cov_t:>10.4f} "
                f"{100 * (cov_o - cov_t):>+8.2f} {set_sizes(ours).mean():>11.3f} "
                f"{set_sizes(theirs).mean():>10.3f} {statistics.median(t_m):>8.3f}s "
                f"{statistics.median(t_p):>7.3f}s {statistics.median(ratios):>6.2f} {same}"
            )


if __name__ == "__main__":
    main()
