"""Time ``monitoring.anomaly`` on about 1,000 images at their own resolution (250 px).

Usage: .venv/bin/python bench/anomaly_native.py [--model tiny-clip] [--image-size 250]
       [--n 1400] [--max-normal 1000] [--threads 2] [--device cpu]
       [--window-scale auto|input|native]

The data is a shapes world of ``--image-size`` px photos with planted defects (10% of the
calibration and test images). Only the calibration and test splits matter to the check, so the
world keeps a small train split (``train_frac=0.05``, ``calibration_frac=0.15``): with the
defaults about 1,000 test rows are evaluated (every defective one and up to ``--max-normal``
normal ones), and the check also scores about 200 calibration rows to choose its headline
method. The model is ``--model`` (any registered name; tiny-clip and lit-mini are trained on the
quick demo's 32-px world, ``--train-world``, and read from the cache), run through a fresh
in-memory engine. Prints the wall time of each stage (summed over the evaluated and the
calibration pass), the check's total, and the images and crops encoded.

Goal: the check in <= 2 minutes on 2 CPU cores for 1,000 images of 250 px.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from mmsafe.audit import evaluation_splits
from mmsafe.checks import AuditContext
from mmsafe.checks.monitoring import anomaly as check_module
from mmsafe.checks.monitoring.anomaly import AnomalyCheck
from mmsafe.data.loading import load_data
from mmsafe.data.worlds import make_shapes
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model

SECONDS: dict[str, float] = defaultdict(float)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[name] += time.perf_counter() - t


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stage(name):
            return fn(*args, **kwargs)

    return wrapper


def instrument(engine: Engine) -> None:
    """Time the check's stages by wrapping what it calls (module globals and engine methods)."""
    names = {
        "embed_windows": "windows: crop, resize, encode",
        "text_prototypes": "prompts",
        "zero_shot_anomaly": "scores and maps",
        "few_shot_anomaly": "scores and maps",
        "fuse": "scores and maps",
        "patch_anomaly": "scores and maps",
        "combine_feature_maps": "patch features: combine",
        "feature_maps": "patch features: forward",  # the code before the engine owned them
        "method_metrics": "metrics (image + pixel)",
        "defect_masks": "masks",
    }
    for attr, label in names.items():
        if hasattr(check_module, attr):
            setattr(check_module, attr, timed(label, getattr(check_module, attr)))
    engine.embed = timed("whole images (engine.embed)", engine.embed)  # type: ignore[method-assign]
    if hasattr(engine, "hidden_states"):
        engine.hidden_states = timed(  # type: ignore[method-assign]
            "patch features: forward", engine.hidden_states
        )
    AnomalyCheck._plots = timed("plots", AnomalyCheck._plots)  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-clip")
    ap.add_argument("--train-world", default="shapes:n=900", help="the world models train on")
    ap.add_argument("--image-size", type=int, default=250)
    ap.add_argument("--n", type=int, default=1400, help="items of the world")
    ap.add_argument("--max-normal", type=int, default=1000)
    ap.add_argument("--defects", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window-scale", default="auto", choices=("auto", "input", "native"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with stage("data: make_shapes"):
        world = make_shapes(
            n=args.n,
            image_size=args.image_size,
            defects=args.defects,
            train_frac=0.05,
            calibration_frac=0.15,
            duplicates=0,  # no train rows are read: no duplicates of them either
            seed=args.seed,
        )
    with stage("model: load"):
        model = load_model(
            args.model, data=load_data(args.train_world), quick=True, device=args.device,
            progress=False,
        )  # fmt: skip
    engine = Engine(device=args.device, progress=False, seed=args.seed)
    evaluated, calibration, train = evaluation_splits(world)
    ctx = AuditContext(
        model=model,
        task=None,  # type: ignore[arg-type]  # monitoring.anomaly reads no task outputs
        data=evaluated,
        outputs=None,  # type: ignore[arg-type]
        engine=engine,
        calibration=calibration,
        train=train,
        seed=args.seed,
    )
    check = AnomalyCheck(max_normal=args.max_normal, n_boot=0, window_scale=args.window_scale)
    instrument(engine)
    t0 = time.perf_counter()
    res = check.run(ctx)
    total = time.perf_counter() - t0

    m = {k: v.value for k, v in res.metrics.items()}
    head = next(f for f in res.findings if "headline_method" in f.evidence).evidence
    acc = engine.accounting()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, --device {args.device}"
    )
    print(
        f"model {args.model} (input {model.input_size} px); world {args.n} items of "
        f"{args.image_size} px; evaluated {int(m['n_defective'] + m['n_normal'])} test rows "
        f"({int(m['n_defective'])} defective), headline {head['headline_method']} "
        f"(chosen on {head['chosen_on']}); window crops at {head['window_crops']}"
    )
    print(
        f"image rows encoded {acc['modalities']['image']['rows_encoded']} "
        f"(duplication {acc['modalities']['image']['duplication']}); "
        f"image AUROC {m['image_auroc']:.3f}, AUPRO {m.get('aupro', float('nan')):.3f}"
    )
    print(
        "per method image AUROC: "
        + ", ".join(f"{k[:-12]} {v:.3f}" for k, v in m.items() if k.endswith("/image_auroc"))
    )
    inside = sum(v for k, v in SECONDS.items() if not k.startswith(("data", "model")))
    for name, sec in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<34} {sec:8.2f} s")
    print(f"  {'(other: bookkeeping, selection)':<34} {total - inside:8.2f} s")
    print(f"monitoring.anomaly total: {total:.1f} s  (goal <= 120 s)")


if __name__ == "__main__":
    main()
