"""The check x model table: full audits of each model on each world, headline figures per check.

Runs ``mmsafe audit`` (all checks, zero-shot) for every ``--models`` x ``--data`` pair into
``--out/<model>__<data>/`` (resumable: a finished check is reused when rerun), then prints a
Markdown table, one row per check, one column per pair, with the headline metrics of each check
(declared below, never chosen on the results). ``--write docs/models_table.md`` also writes it.

    .venv/bin/python bench/model_table.py --models tiny-clip,lit-mini --data shapes,digits \
        --out /tmp/model-table --write docs/models_table.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# check -> (metric, label) pairs shown in its cell; fixed before any run
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "performance.classification": [("accuracy", "acc")],
    "robustness.adversarial": [
        ("clean_accuracy", "clean"),
        ("linf/pgd/eps=0.003922/robust_accuracy", "PGD 1/255"),
        ("linf/pgd/eps=0.01569/robust_accuracy", "PGD 4/255"),
    ],
    "robustness.shift": [
        ("mean_corruption_accuracy/image", "mCA"),
        ("relative_robustness/image", "rel"),
    ],
    "monitoring.anomaly": [("image_auroc", "image AUROC"), ("aupro", "AUPRO")],
    "monitoring.calibration": [("ece", "ECE")],
    "monitoring.conformal": [("coverage", "coverage"), ("mean_set_size", "set size")],
    "monitoring.ood": [("auroc", "AUROC"), ("fpr95", "FPR95")],
    "monitoring.slices": [("n_significant", "slices"), ("slice1/accuracy", "worst acc")],
    "monitoring.uncertainty": [("entropy_gap", "entropy gap"), ("avu", "AvU")],
    "controllability.explain": [("ig/deletion_gap", "IG del. gap")],
    "controllability.fairness": [
        ("statistical_parity_difference_worst", "SPD"),
        ("accuracy_difference", "acc diff"),
    ],
    "controllability.privacy": [("auc", "MIA AUC"), ("duplicate_rank_auc", "dup AUC")],
    "efficiency.profile": [("params_total", "params"), ("image/flops", "image FLOPs")],
}


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e4:
        return f"{value:.2g}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value)}"


def cell(card: dict, check: str) -> str:
    entry = card["checks"].get(check)
    if entry is None:
        return "–"
    if entry["status"] != "ok":
        return f"*{entry['status']}*"
    parts = []
    for metric, label in HEADLINES[check]:
        m = entry["metrics"].get(metric)
        if m is not None:
            parts.append(f"{label} {fmt(m['value'])}")
    return ", ".join(parts) or "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-clip,lit-mini")
    ap.add_argument("--data", default="shapes,digits")
    ap.add_argument("--out", default="/tmp/model-table")
    ap.add_argument("--write", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args()
    mmsafe = Path(sys.executable).with_name("mmsafe")
    cards, seconds = {}, {}
    for model in args.models.split(","):
        for data in args.data.split(","):
            out = Path(args.out) / f"{model}__{data.replace(':', '_')}"
            cmd = [str(mmsafe), "audit", "--model", model, "--data", data, "--out", str(out)]
            t = time.perf_counter()
            rc = subprocess.run(cmd, env={**os.environ, "COLUMNS": "100"}).returncode
            seconds[(model, data)] = time.perf_counter() - t
            print(f"{model} on {data}: exit {rc}, {seconds[(model, data)]:.0f} s", flush=True)
            cards[(model, data)] = json.loads((out / "card.json").read_text())
    pairs = list(cards)
    lines = [
        "| check | " + " | ".join(f"{m} on `{d}`" for m, d in pairs) + " |",
        "|---" * (len(pairs) + 1) + "|",
    ]
    for check in HEADLINES:
        lines.append(f"| `{check}` | " + " | ".join(cell(cards[p], check) for p in pairs) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        head = (
            f"<!-- written by bench/model_table.py on {datetime.date.today()}, "
            f"{platform.machine()}, {os.cpu_count()} cores -->\n"
        )
        Path(args.write).write_text(head + table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
