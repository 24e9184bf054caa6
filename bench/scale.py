"""Scale: rows/s and peak RSS of the core checks at 10^4, 10^5 and 10^6 rows.

Each size runs in its own process (so each peak RSS is that audit's alone): the shapes world
``shapes:n=<N>`` (lazy above ``LAZY_ROWS``: pixels rendered in the engine's batches), the default
tiny-clip, and the core checks (performance, calibration, conformal, OOD, slices, uncertainty)
through ``run_audit`` with an on-disk engine cache in a temporary folder. The audited rows are
the world's test split (a fifth of ``N``); the engine also encodes the calibration split (a
fifth) for the checks that fit on it, and the checks' own variants (corruptions, views).

Printed per size: world definition time, audit time, rows/s (world rows / audit seconds),
peak RSS, the seconds of each check, and which checks capped or sampled a reference bank.

    .venv/bin/python bench/scale.py [--sizes 10000,100000,1000000] [--checks ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time

CORE = (
    "performance.classification,monitoring.calibration,monitoring.conformal,monitoring.ood,"
    "monitoring.slices,monitoring.uncertainty"
)


def one(n: int, checks: str, workers: int | None, keep: str | None = None) -> dict:
    """Audit ``shapes:n=<n>`` in this process; the figures as a dict."""
    import torch

    from mmsafe.audit import run_audit
    from mmsafe.data.loading import load_data
    from mmsafe.engine import Engine
    from mmsafe.models.loading import load_model

    model = load_model("tiny-clip", data=load_data("shapes"), progress=False)
    t = time.perf_counter()
    data = load_data(f"shapes:n={n}")
    define_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(batch_size=256, cache_dir=f"{tmp}/cache", progress=False, workers=workers)
        t = time.perf_counter()
        out = keep or f"{tmp}/out"  # --keep: the report folder (and its mmsafe.log) stays
        result = run_audit(model, data, checks=checks, engine=engine, out=out)
        audit_s = time.perf_counter() - t
    card = result.card
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "rows": len(data),
        "audited": card["data"]["n_evaluated"],
        "define_s": round(define_s, 2),
        "audit_s": round(audit_s, 2),
        "rows_per_s": round(len(data) / audit_s, 1),
        "rows_encoded": card["engine"]["rows_encoded"],
        "peak_rss_mib": round(peak, 1),
        "checks": {
            name: {
                "status": c["status"],
                "seconds": round(card["timings"]["seconds"].get(name, 0.0), 2),
                "limits": c.get("limits"),
                "reason": c.get("reason"),
            }
            for name, c in card["checks"].items()
        },
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--checks", default=CORE)
    ap.add_argument("--workers", type=int, default=None, help="engine DataLoader workers")
    ap.add_argument("--keep", help="keep the report folder of --one here")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.checks, args.workers, args.keep)))
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(
        "| rows | audited | define s | audit s | rows/s | rows encoded | peak RSS MiB "
        "| per check s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--one", str(n), "--checks", args.checks]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"| {n} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        per = ", ".join(
            f"{k.split('.')[-1]} {v['seconds']}"
            + ("" if v["status"] == "ok" else f" ({v['status']})")
            for k, v in r["checks"].items()
        )
        print(
            f"| {r['rows']} | {r['audited']} | {r['define_s']} | {r['audit_s']} | "
            f"{r['rows_per_s']} | {r['rows_encoded']} | {r['peak_rss_mib']} | {per} |",
            flush=True,
        )
        for k, v in r["checks"].items():
            if v["status"] != "ok":
                print(f"  {k}: {v['status']}: {v['reason']}")
        limits = {k: v["limits"] for k, v in r["checks"].items() if v["limits"]}
        if limits:
            print(f"  capped or sampled: {json.dumps(limits)}")


if __name__ == "__main__":
    main()
