"""Time the batched corruptions of mmsafe.methods.perturb (and imagecorruptions, if installed).

Usage: .venv/bin/python bench/corruptions.py [--batch 256] [--side 32] [--device cpu]
       [--out bench/corruptions_results.md]

Reports milliseconds per image for each corruption at severity 3 (median of 3 runs), and, when
the `imagecorruptions` package imports (e.g. `imagecorruptions-imaug` installed with
`pip install --target DIR` and put on PYTHONPATH for this script only), its per-image numpy
time on the same images (one image at a time, as that package works; after a warm-up call).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from mmsafe.data.worlds import make_shapes
from mmsafe.methods.perturb import (
    IMAGE_CORRUPTIONS,
    TEXT_PERTURBATIONS,
    corrupt_images,
    perturb_texts,
)
from mmsafe.models.base import images_to_tensor


def _time(fn, repeats: int = 3) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    world = make_shapes(n=max(args.batch, 50), image_size=args.side)
    images = world.modalities["image"][: args.batch]
    px = images_to_tensor(images, args.side).to(dev)
    try:
        from imagecorruptions import corrupt as ref_corrupt  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - optional reference
        ref_corrupt = None
    rows = []
    for name in IMAGE_CORRUPTIONS:
        corrupt_images(px[:4], name, 3)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()

        def run(name: str = name) -> None:
            corrupt_images(px, name, 3, seed=0)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        ours = _time(run) / len(images) * 1e3
        ref = None
        if ref_corrupt is not None:
            try:
                ref_corrupt(images[0], corruption_name=name, severity=3)  # warm-up (numba JIT)
                ref = (
                    _time(
                        lambda n=name: [
                            ref_corrupt(im, corruption_name=n, severity=3) for im in images
                        ],
                        1,
                    )
                    / len(images)
                    * 1e3
                )
            except Exception:  # noqa: BLE001 - name not in the reference
                ref = None
        rows.append((name, ours, ref))
    texts = [str(t) for t in world.modalities["text"][: args.batch]]
    text_rows = [
        (n, _time(lambda n=n: perturb_texts(texts, n, 3)) / len(texts) * 1e3)
        for n in TEXT_PERTURBATIONS
    ]
    head = (
        f"batch {len(images)} x {args.side}px on {dev} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    lines = [
        "# Corruption timings (`bench/corruptions.py`)",
        "",
        head,
        "",
        "| corruption (severity 3) | mmsafe ms/image | imagecorruptions ms/image |",
        "|---|---:|---:|",
    ]
    for name, ours, ref in rows:
        lines.append(f"| {name} | {ours:.3f} | {'n/a' if ref is None else f'{ref:.3f}'} |")
    lines += ["", "| text perturbation (severity 3) | ms/text |", "|---|---:|"]
    lines += [f"| {n} | {t:.4f} |" for n, t in text_rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
