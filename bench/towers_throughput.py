"""lit-mini's image tower: images/s through mmsafe's engine vs a bare inference loop.

Both sides run in this one process on the same lit-mini (the default world's, loaded from the
cache or trained once before timing), over the same images in the same batches:

* **engine**: ``Engine(batch_size=B).embed(model, data, "image", rows=...)`` with a fresh
  engine each run (an in-memory cache, so every row is really encoded): preprocessing, the
  MobileNetV2 tower, the head, normalisation, the engine's batching, seeds and bookkeeping;
* **bare**: ``model.preprocess`` + ``model.encode`` per batch under ``torch.inference_mode``.

Runs alternate to cancel drift; the headline is the median of the per-pair ratios
(engine images/s over bare images/s). Goal: ratio >= 0.9. The tower-only rate (pooled features
of already preprocessed pixels) is printed beside it, on the tower's fast path (batch norms
folded into the convolutions, chunks of 8 images at 96 px) and on its plain modules (what runs
when a hook watches the tower).

    .venv/bin/python bench/towers_throughput.py [--rows 1024] [--repeats 7] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from mmsafe.data.worlds.shapes import make_shapes
from mmsafe.engine import Engine
from mmsafe.models.loading import load_model


def bare(model, images, batch_size: int) -> None:
    """The same batches, no engine: preprocess + encode under ``inference_mode``."""
    with torch.inference_mode():
        for lo in range(0, len(images), batch_size):
            batch = model.preprocess("image", images[lo : lo + batch_size])
            model.encode({"image": batch.to(model.device)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    data = make_shapes()
    model = load_model("lit-mini", data=data, device=args.device, progress=False).eval()
    rows = list(range(min(args.rows, len(data))))
    images = [data.modalities["image"][i] for i in rows]
    model.fingerprint()  # hashed once per model; not part of a forward pass

    def engine_run() -> float:
        start = time.perf_counter()
        Engine(device=args.device, batch_size=args.batch_size, progress=False).embed(
            model, data, "image", rows=rows
        )
        return len(rows) / (time.perf_counter() - start)

    def bare_run() -> float:
        start = time.perf_counter()
        bare(model, images, args.batch_size)
        return len(rows) / (time.perf_counter() - start)

    engine_run(), bare_run()  # warm-up (allocator, oneDNN kernels)
    eng, raw, ratios = [], [], []
    for i in range(args.repeats):
        pair = (engine_run, bare_run) if i % 2 == 0 else (bare_run, engine_run)
        a, b = pair[0](), pair[1]()
        e, r = (a, b) if i % 2 == 0 else (b, a)
        eng.append(e)
        raw.append(r)
        ratios.append(e / r)
        print(f"run {i}: engine {e:.0f} img/s, bare {r:.0f} img/s, ratio {e / r:.3f}", flush=True)

    pixels = model.preprocess("image", images[: args.batch_size]).to(model.device)

    def tower_rate() -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            model.image.pooled(pixels)
            return len(pixels) / (time.perf_counter() - start)

    tower = max(tower_rate() for _ in range(3))
    # a hook on the tower makes it run its modules as they are: whole batch, batch norms apart
    hook = model.image.features.register_forward_hook(lambda *_: None)
    try:
        plain = max(tower_rate() for _ in range(3))
    finally:
        hook.remove()

    print(
        f"\nlit-mini image tower, {len(rows)} images at {model.input_size} px, batch "
        f"{args.batch_size}, {args.device}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"engine: median {statistics.median(eng):.0f} img/s")
    print(f"bare:   median {statistics.median(raw):.0f} img/s")
    print(f"tower only (pooled features of preprocessed pixels): {tower:.0f} img/s")
    print(f"tower only, plain modules (no folding, no chunks): {plain:.0f} img/s")
    print(f"median paired ratio engine/bare: {statistics.median(ratios):.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
