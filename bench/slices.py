"""Scaling of slice discovery (PCA + error-aware EM + slice scoring) from 10^4 to 10^6 rows.

Synthetic data, generated in float32 chunks: 64-dim embeddings from 20 Gaussian clusters of
equal weight, 5 classes (``cluster % 5``); the model is right with probability 0.9 everywhere
except in one planted cluster (5% of the rows), where it is right with probability 0.2. Soft
predictions are a softmax of noisy logits around the predicted class.

For each size the script reports:

* **time**: wall time of :func:`mmsafe.methods.slices.discover_slices` (PCA to 64 dims, the mixture
  with 16 components, gamma 1 (DOMINO's default) and k-means++ initialisation, then scoring),
  with
  ``tol=0`` so every size runs exactly ``--iters`` EM iterations (the growth factor then
  measures the cost per row, not how fast EM happens to converge);
* **peak memory**: the ``tracemalloc`` peak of a second call with 2 EM iterations (memory does
  not grow with iterations), i.e. everything allocated beyond the inputs (the PCA projection,
  the one-hot labels, the ``(N, K)`` memberships, the chunk temporaries);
* **precision**: the share of planted-cluster rows in the slice ranked first.

The cost per EM iteration does not depend on gamma or the initialisation. (With the check's
defaults, gamma 5 and the confusion initialisation, the slice ranked first at 10^5 rows here is
a pure-error slice of one confusion cell scattered over many clusters rather than the planted
cluster; see docs/slices.md.)

Growth factors are the ratios between consecutive sizes (10x rows each): linear scaling gives
about 10.

    .venv/bin/python bench/slices.py [--sizes 10000 100000 1000000] [--iters 30]
"""

from __future__ import annotations

import argparse
import platform
import time
import tracemalloc

import numpy as np
import torch

from mmsafe.methods.slices import discover_slices

DIM, CLUSTERS, CLASSES, PLANTED = 64, 20, 5, 7


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(z, labels, probs, planted)`` for ``n`` rows (float32 embeddings and probabilities)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (CLUSTERS, DIM)).astype(np.float32)
    cluster = rng.integers(0, CLUSTERS, n)
    z = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        sl = slice(start, min(n, start + 100_000))
        z[sl] = centres[cluster[sl]] + rng.normal(0.0, 0.5, (sl.stop - sl.start, DIM))
    labels = cluster % CLASSES
    planted = cluster == PLANTED
    right = rng.uniform(size=n) < np.where(planted, 0.2, 0.9)
    preds = np.where(right, labels, (labels + rng.integers(1, CLASSES, n)) % CLASSES)
    logits = rng.normal(0.0, 1.0, (n, CLASSES)).astype(np.float32)
    logits[np.arange(n), preds] += 3.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return z, labels, probs, planted


def run(n: int, iters: int) -> dict[str, float]:
    """Time, peak memory and planted-slice precision of slice discovery on ``n`` rows."""
    z, labels, probs, planted = synthetic(n)
    kw = dict(n_slices=16, gamma=1.0, n_pca=64, init="kmeans++", tol=0.0)
    t0 = time.perf_counter()
    fit, table = discover_slices(z, labels, probs, max_iter=iters, **kw)
    seconds = time.perf_counter() - t0
    top = fit.hard == table.order[0]
    tracemalloc.start()
    discover_slices(z, labels, probs, max_iter=2, **kw)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "n": n,
        "seconds": seconds,
        "per_iter_ms": 1000 * seconds / iters,
        "peak_mib": peak / 2**20,
        "input_mib": (z.nbytes + probs.nbytes + labels.nbytes) / 2**20,
        "precision": float(planted[top].mean()),
        "top_size": int(top.sum()),
    }


def main() -> None:
    """Run every size and print a table with growth factors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, numpy {np.__version__}, "
        f"torch threads {torch.get_num_threads()}, {args.iters} EM iterations, K=16, d=64, gamma=1"
    )
    rows = []
    for n in args.sizes:
        r = run(n, args.iters)
        rows.append(r)
        print(
            f"N={n:>9,d}  time {r['seconds']:8.2f} s ({r['per_iter_ms']:7.1f} ms/iter)  "
            f"peak {r['peak_mib']:8.1f} MiB (inputs {r['input_mib']:.1f} MiB)  "
            f"top-slice precision {r['precision']:.3f} (size {r['top_size']:,d}; "
            f"planted {n // CLUSTERS:,d})",
            flush=True,
        )
    for a, b in zip(rows, rows[1:], strict=False):
        print(
            f"{a['n']:,d} -> {b['n']:,d} rows (x{b['n'] / a['n']:.0f}): time x"
            f"{b['seconds'] / a['seconds']:.2f}, peak memory x{b['peak_mib'] / a['peak_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
