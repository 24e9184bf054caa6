"""The Ray backend vs the local engine: seconds to embed the same lazy rows on the same CPUs.

In one process, alternating (so a slow spell of a shared machine hits both): the images of
``shapes:n=<N>`` (lazy: rendered in the engine's batches) embedded by the default tiny-clip with

* ``local``: the local engine as ``mmsafe audit`` runs it (``--workers`` default: one DataLoader
  process renders while the forward passes run) with ``--threads`` torch threads;
* ``ray``: the Ray backend with ``--ray-workers`` actors on a local Ray cluster of this machine's
  CPUs, each with ``--threads / --ray-workers`` torch threads (1 on 2 cores), ``min_shards=1``;
* ``local-1t`` (first round only): the local engine with 1 torch thread, for scaling efficiency
  (``local-1t seconds / (ray seconds * ray workers)``).

Every run gets a fresh temporary cache folder and a freshly loaded world, so nothing is reused
(not even the world's walk through its noise stream). The Ray cluster is started before the
first timed run (its start-up is printed on its own); each Ray run pays its actor pool's
start-up (importing torch and the model in each actor), as every fill of an audit does.

    .venv/bin/python bench/ray_backend.py [--rows 60000] [--rounds 2] [--ray-workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def embed_once(
    kind: str, rows: int, threads: int, ray_workers: int, batch_size: int
) -> tuple[Tensor, float]:
    """``(embeddings, seconds)`` of every image of a fresh ``shapes:n=<rows>`` world."""
    import torch

    from mmsafe.data.loading import load_data
    from mmsafe.engine import Engine
    from mmsafe.engine.ray_backend import RayBackend
    from mmsafe.models.loading import load_model

    model = load_model("tiny-clip", data=load_data("shapes"), progress=False)
    data = load_data(f"shapes:n={rows}")
    backend = None
    if kind == "ray":
        per = max(1, threads // ray_workers)
        backend = RayBackend(workers=ray_workers, threads_per_worker=per, min_shards=1)
    torch.set_num_threads(1 if kind == "local-1t" else threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(batch_size=batch_size, cache_dir=tmp, progress=False, backend=backend)
        start = time.perf_counter()
        emb = engine.embed(model, data, "image")
        seconds = time.perf_counter() - start
    n = len(data)  # the world's rows: its items and their planted duplicates
    assert emb.shape[0] == n and engine.accounting()["rows_encoded"] == n
    if backend is not None:
        assert backend.totals["rows"] == n, backend.totals  # every row went through Ray
        busy = ", ".join(f"{r} rows in {t:.1f} s" for r, t in backend.last_fill["per_worker"])
        print(f"  ray workers (rows, busy seconds): {busy}")
    return emb, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=60000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the local engine")
    ap.add_argument("--ray-workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    import ray
    import torch

    from mmsafe.engine import runner
    from mmsafe.engine.ray_backend import RayBackend

    shards = -(-args.rows // runner.SHARD_ROWS)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}"
    )
    print(
        f"shapes:n={args.rows} images ({shards} shards of {runner.SHARD_ROWS}), tiny-clip, "
        f"batch {args.batch_size}; local: {args.threads} threads; ray: {args.ray_workers} "
        f"workers x {max(1, args.threads // args.ray_workers)} thread(s)"
    )
    start = time.perf_counter()
    RayBackend(workers=args.ray_workers)._ensure_ray()
    print(f"ray cluster start-up: {time.perf_counter() - start:.1f} s (once per process)")
    times: dict[str, list[float]] = {"local": [], "ray": [], "local-1t": []}
    first: dict[str, Tensor] = {}
    for r in range(args.rounds):
        kinds = ["local", "ray"] if r % 2 == 0 else ["ray", "local"]
        if r == 0:
            kinds.append("local-1t")
        for kind in kinds:
            emb, s = embed_once(kind, args.rows, args.threads, args.ray_workers, args.batch_size)
            n = len(emb)
            if kind not in first:
                first[kind] = emb
            times[kind].append(s)
            print(f"round {r + 1} {kind:9s} {s:7.1f} s  {n / s:7.0f} rows/s ({n} rows)", flush=True)
    same = torch.equal(first["local"], first["ray"])
    print(f"ray embeddings identical to the local engine's: {same}")
    local, ray_s = statistics.median(times["local"]), statistics.median(times["ray"])
    print(f"median local {local:.1f} s, ray {ray_s:.1f} s: ray/local = {ray_s / local:.2f}")
    if times["local-1t"]:
        one = times["local-1t"][0]
        eff = one / (ray_s * args.ray_workers)
        print(
            f"local 1 thread {one:.1f} s; ray speed-up over it {one / ray_s:.2f}x on "
            f"{args.ray_workers} workers: scaling efficiency {eff:.0%}"
        )


if __name__ == "__main__":
    main()
