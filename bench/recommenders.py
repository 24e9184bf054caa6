"""Recommenders on shapes-rec: mm-sasrec against popularity and ID-based SASRec, and the audit.

Trains (or loads from the cache) mm-sasrec over tiny-clip's item embeddings and sasrec-id on
the default ``shapes-rec`` world, then runs the recommender audit (``performance.ranking``,
``monitoring.cold_start`` and whichever other recommender checks are registered) on each, warm
(a second run, models cached), and prints NDCG@10 against popularity, cold-start HR@10 and the
audit's wall time. Goals (issue 15): mm-sasrec's full-ranking NDCG@10 >= 2x popularity's; the
whole recommender audit <= 5 minutes on 2 cores, warm.

    .venv/bin/python bench/recommenders.py [--seed 0] [--world shapes-rec] [--encoder tiny-clip]
"""

from __future__ import annotations

import argparse
import time

from mmsafe.audit import run_audit
from mmsafe.checks import get_check, list_checks
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine, default_cache_dir
from mmsafe.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="shapes-rec")
    ap.add_argument("--encoder", default="tiny-clip")
    args = ap.parse_args()

    data = load_data(args.world)
    checks = [n for n in list_checks() if "recommender" in get_check(n).kinds]
    print(f"{args.world}: {len(data)} users, {len(data.classes)} items; checks: {checks}")
    for name in (f"mm-sasrec:{args.encoder}", "sasrec-id"):
        start = time.perf_counter()
        model = load_model(name, data=data, seed=args.seed, progress=False)
        loaded = time.perf_counter() - start
        info = model.training_info
        runs = []
        for _ in range(2):  # cold (fits the check's baseline), then warm (loads it)
            engine = Engine(progress=False, cache_dir=default_cache_dir())
            start = time.perf_counter()
            card = run_audit(model, data, task="seqrec", checks=checks, engine=engine,
                             seed=args.seed).card  # fmt: skip
            runs.append(time.perf_counter() - start)
        m = card["checks"]["performance.ranking"]["metrics"]
        c = card["checks"]["monitoring.cold_start"]["metrics"]
        print(
            f"{name}: NDCG@10 {m['ndcg@10']['value']:.4f} (popularity "
            f"{m['popularity/ndcg@10']['value']:.4f}, lift "
            f"{m['lift/ndcg@10_vs_popularity']['value']:.2f}x; sasrec-id "
            f"{m['sasrec-id/ndcg@10']['value']:.4f}); HR@10 {m['hr@10']['value']:.4f}; "
            f"cold HR@10 {c['cold/hr@10']['value']:.4f} vs warm {c['warm/hr@10']['value']:.4f}"
        )
        print(
            f"  trained {info.get('epochs')} epochs at {info.get('seconds_per_epoch')} s "
            f"(validation NDCG@10 {info.get('validation_ndcg@10')}); load {loaded:.1f} s; "
            f"audit {runs[0]:.1f} s, warm {runs[1]:.1f} s"
        )
        for check, entry in card["checks"].items():
            t = card["timings"]["seconds"].get(check, "?")
            print(f"  {check}: {entry['status']} {t} s; findings "
                  f"{[f['severity'] for f in entry['findings']]}")  # fmt: skip


if __name__ == "__main__":
    main()
