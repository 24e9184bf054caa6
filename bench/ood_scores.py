"""``monitoring.ood`` per score and its headline, over models and shapes worlds.

For each model and world seed, the model is trained on that world (default recipe, from the
cache when known) and the check runs on its test split through ``run_audit``; the table shows
every score's AUROC, the headline score and how it was chosen, and the headline AUROC with its
bootstrap CI. The shapes world plants its never-seen shapes (star, heart, crescent) in the test
split only, so the headline is the declared default (``rmd``, then ``energy``): the seeds other
than 0 are worlds no default was looked at on.

    .venv/bin/python bench/ood_scores.py [--models tiny-clip,lit-mini] [--seeds 0,1,2,3,4]
"""

from __future__ import annotations

import argparse
import platform

import torch

from mmsafe.audit import run_audit
from mmsafe.checks.monitoring.ood import SCORES
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-clip,lit-mini")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--world", default="shapes", help="world spec; ',seed=<s>' is appended")
    args = ap.parse_args()
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    head = " | ".join(SCORES)
    print(f"| model | seed | {head} | headline (chosen on) | headline AUROC (95% CI) |")
    print("|---|---|" + "---|" * len(SCORES) + "---|---|")
    for name in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            sep = "," if ":" in args.world else ":"
            spec = args.world if seed == 0 else f"{args.world}{sep}seed={seed}"
            data = load_data(spec)
            model = load_model(name, data=data, progress=False)
            res = run_audit(model, data, checks="monitoring.ood", engine=Engine(progress=False))
            entry = res.card["checks"]["monitoring.ood"]
            m = entry["metrics"]
            ev = next(f["evidence"] for f in entry["findings"] if "chosen_on" in f["evidence"])
            cells = " | ".join(
                f"{m[f'{s}/auroc']['value']:.3f}" if f"{s}/auroc" in m else "–" for s in SCORES
            )
            lo, hi = m["auroc"]["ci"]
            print(
                f"| {name} | {seed} | {cells} | {ev['headline_method']} ({ev['chosen_on']}) | "
                f"{m['auroc']['value']:.3f} ({lo:.3f}–{hi:.3f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
