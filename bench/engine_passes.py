"""Pass accounting of the full audit: rows encoded vs distinct (row, variant) pairs.

Runs the equivalent of ``mmsafe demo --quick`` (tiny-clip quick on ``shapes:n=900``, every
check, zero-shot) through the Python API with a fresh in-memory engine, and prints the card's
``engine`` section: per modality the rows encoded, the distinct (row, variant) pairs and their
ratio (``duplication``), and the attack, gradient and training passes counted apart.
Goal: total duplication <= 1.05. Deterministic: counts only, no timings.

    .venv/bin/python bench/engine_passes.py [--data shapes:n=900] [--checks all]
"""

from __future__ import annotations

import argparse
import json
import tempfile

from mmsafe.audit import run_audit
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shapes:n=900")
    ap.add_argument("--checks", default="all")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = load_data(args.data)
    model = load_model("tiny-clip", data=data, quick=True, device=args.device, progress=False)
    engine = Engine(device=args.device, batch_size=256, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_audit(model, data, checks=args.checks, engine=engine, out=tmp, resume=False)
    statuses = {k: r.status for k, r in result.results.items()}
    n_ok = sum(s == "ok" for s in statuses.values())
    print(f"data: {args.data}; checks: {len(statuses)} ({n_ok} ok)")
    failed = {k: r.reason for k, r in result.results.items() if r.status == "failed"}
    if failed:
        print(f"failed: {failed}")
    print(json.dumps(result.card["engine"], indent=2))
    print(f"duplication: {result.card['engine']['duplication']:.4f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
