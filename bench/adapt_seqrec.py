"""Adaptation methods in IISAN's own setting: a SASRec over each method's item representation.

``adapt(..., objective="seqrec")`` on the ``shapes-rec`` world (default: 2,000 users, 300
items), leave-one-out, full ranking with the history excluded. Methods: ``full``, ``lora``,
``adapter``, ``iisan``, ``iisan-versa`` and ``momef`` (cached hidden states; cache build time
reported apart), plus ``iisan-uncached`` (the frozen towers run in every step). The same seed,
batch order and in-batch softmax for every method, one torch thread, after one discarded
warm-up epoch. Prints NDCG@10, HR@10, s/epoch, peak memory without and with the backbone's
resident weights, trainable parameters, TPME, and IISAN's speed-up and memory ratio against
full fine-tuning (paper: 20x faster epochs, 15.7x less memory).

    MMSAFE_CACHE_DIR=/tmp/demo-cache .venv/bin/python bench/adapt_seqrec.py [--epochs 5]
    .venv/bin/python bench/adapt_seqrec.py --data shapes-rec:n_users=300,n_items=80 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np
import torch

from mmsafe.data.loading import load_data
from mmsafe.methods.adapt import (
    AdaptReport,
    adapt,
    markdown_table,
    ranking_scores,
    sequences_of,
    with_tpme,
)
from mmsafe.metrics.ranking import popularity_scores
from mmsafe.models.loading import load_model

METHODS = ("full", "lora", "adapter", "iisan", "iisan-versa", "momef", "iisan-uncached")


def ratios(reports: list[AdaptReport]) -> str:
    by = {r.method: r for r in reports}
    full, lines = by["full"], []
    for name in ("iisan", "iisan-versa", "momef", "iisan-uncached"):
        if name not in by:
            continue
        side = by[name]
        t = full.epoch_seconds / side.epoch_seconds
        m = full.peak_memory_mib / max(side.peak_memory_mib, 1e-9)
        mb = full.peak_memory_with_backbone_mib / max(side.peak_memory_with_backbone_mib, 1e-9)
        rel = (side.accuracy - full.accuracy) / max(full.accuracy, 1e-9)
        lines.append(
            f"FFT / {name}: time {t:.1f}x, memory {m:.1f}x (with backbone weights {mb:.1f}x); "
            f"NDCG@10 {side.accuracy:.3f} vs {full.accuracy:.3f} ({100 * rel:+.1f}% relative)"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="shapes-rec")
    p.add_argument("--model", default="tiny-clip")
    p.add_argument(
        "--encoder-data",
        default="shapes:n=900,train_defects=0",
        help="The world the encoder is (quick-)trained on (from the model cache).",
    )
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, 1 thread, data {args.data}, epochs {args.epochs}, "
        f"batch {args.batch_size}, device {args.device}"
    )
    data = load_data(args.data)
    model = load_model(
        args.model, data=load_data(args.encoder_data), quick=True, progress=False,
        device=args.device,
    )  # fmt: skip
    n_back = sum(q.numel() for q in model.parameters())
    seqs, n_items = sequences_of(data), len(data.catalog)
    pop = np.broadcast_to(popularity_scores(seqs, n_items), (len(data), n_items))
    popularity = ranking_scores(pop, seqs, data.labels)
    print(f"# {len(data)} users, {n_items} items; {args.model}: {n_back} backbone parameters")
    print(f"# popularity: NDCG@10 {popularity['ndcg@10']:.3f}, HR@10 {popularity['hr@10']:.3f}")
    kw = {"objective": "seqrec", "epochs": args.epochs, "batch_size": args.batch_size,
          "seed": 0, "threads": 1, "device": args.device}  # fmt: skip
    adapt(model, data, data, "full", **{**kw, "epochs": 1})  # warm-up, discarded
    reports = []
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        if method == "iisan-uncached":
            rep = adapt(model, data, data, "iisan", cache=False, **kw).report
            rep = dataclasses.replace(rep, method=method)
        else:
            rep = adapt(model, data, data, method, **kw).report
        reports.append(rep)
        print(
            f"  {method:15s} {rep.epoch_seconds:8.3f} s/epoch  {rep.peak_memory_mib:8.1f} MiB "
            f"({rep.peak_memory_with_backbone_mib:8.1f} with backbone)  "
            f"{rep.trainable_params:>9d} params  NDCG@10 {rep.accuracy:.3f}  "
            f"(cache {rep.cache_seconds:.2f} s, total {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    reports = with_tpme(reports)
    print()
    print(markdown_table(reports))
    print()
    print(ratios(reports), flush=True)


if __name__ == "__main__":
    main()
