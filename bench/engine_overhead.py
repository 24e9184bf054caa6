"""Engine overhead: the core audit vs the bare forward passes it needs.

Both run in this one process on the same model (tiny-clip on the default shapes world, loaded
from the cache or trained once before timing) and the same rows:

* **audit**: ``run_audit(model, data, checks=CORE, out=tmp)`` with a fresh engine (in-memory
  cache, so embeddings are really computed), including task preparation, the core checks
  (``performance.classification,monitoring.calibration``: those that need nothing but the
  shared forward passes; the pillar checks run their own extra forward passes, which is work,
  not overhead), the
  bootstrap CIs, the card, the JSON Schema validation and the HTML;
* **bare**: the same batches through the same model, with no checks: the class prompts through
  the text tower and the evaluated images through the image tower, under ``inference_mode``.

Runs alternate to cancel drift; the headline is the median of the per-pair ratios (robust to
load from other processes), with the ratio of medians and of the fastest runs beside it.
Goal: ratio <= 1.10.

    .venv/bin/python bench/engine_overhead.py [--repeats 7] [--data shapes] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from mmsafe.audit import evaluation_splits, run_audit
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model
from mmsafe.tasks import DEFAULT_TEMPLATES, build_prompts


def bare_forward(model, images, prompts, batch_size: int, device: torch.device) -> None:
    """The forward passes an audit of zero-shot needs, and nothing else."""
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            batch = model.preprocess("text", prompts[start : start + batch_size])
            model.encode({"text": {k: v.to(device) for k, v in batch.items()}})
        for start in range(0, len(images), batch_size):
            batch = model.preprocess("image", images[start : start + batch_size])
            model.encode({"image": batch.to(device)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checks", default="performance.classification,monitoring.calibration")
    args = ap.parse_args()

    data = load_data(args.data)
    # the default tiny-clip (trained on the default world, cached) audits any --data
    model = load_model("tiny-clip", data=load_data("shapes"), device=args.device, progress=False)
    device = torch.device(args.device)
    model = model.to(device).eval()
    evaluated, _, _ = evaluation_splits(data)
    images = evaluated.modalities["image"]
    prompts = build_prompts(evaluated.classes, DEFAULT_TEMPLATES)

    # warm-up both paths once (allocator, lazy imports, template compilation)
    bare_forward(model, images, prompts, args.batch_size, device)
    with tempfile.TemporaryDirectory() as tmp:
        run_audit(
            model,
            data,
            checks=args.checks,
            engine=Engine(device=args.device, progress=False),
            out=tmp,
        )

    audit_s, bare_s = [], []

    def time_bare() -> None:
        t = time.perf_counter()
        bare_forward(model, images, prompts, args.batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        bare_s.append(time.perf_counter() - t)

    def time_audit() -> object:
        with tempfile.TemporaryDirectory() as tmp:
            engine = Engine(device=args.device, batch_size=args.batch_size, progress=False)
            t = time.perf_counter()
            result = run_audit(
                model, data, checks=args.checks, engine=engine, out=tmp, resume=False
            )
            audit_s.append(time.perf_counter() - t)
        return result

    for i in range(args.repeats):  # alternate which goes first, to cancel order effects
        if i % 2:
            result = time_audit()
            time_bare()
        else:
            time_bare()
            result = time_audit()
    checks = ", ".join(result.results)
    a, b = statistics.median(audit_s), statistics.median(bare_s)
    pair = statistics.median(x / y for x, y in zip(audit_s, bare_s, strict=True))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}, device {args.device}"
    )
    print(
        f"data: {args.data} ({len(evaluated)} evaluated rows, {len(prompts)} prompts); "
        f"checks: {checks}"
    )
    print(f"bare forward passes: median {b:.3f} s over {args.repeats} runs")
    print(f"full audit:          median {a:.3f} s over {args.repeats} runs")
    print(
        f"fastest runs:        audit {min(audit_s):.3f} s, bare {min(bare_s):.3f} s, "
        f"ratio {min(audit_s) / min(bare_s):.3f}"
    )
    print(f"ratio of medians:    {a / b:.3f}")
    print(f"median paired ratio: {pair:.3f}  (goal <= 1.10)")


if __name__ == "__main__":
    main()
