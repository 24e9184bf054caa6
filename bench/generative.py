"""The generative pillar: quality-metric speed against torchmetrics, generation throughput, and
the audit's generator calls against the minimum its checks need.

1. FID and KID: :mod:`mmsafe.methods.generative.quality` against torchmetrics'
   ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` fed the same features through an
   identity extractor, alternated in one process; seconds of each, their ratio, and the largest
   difference of the values.
2. Generation throughput of a tiny-diffusion (default architecture; untrained weights cost the
   same FLOPs as trained ones unless ``--trained``): images per second through
   ``Engine.generate_images`` (batched, cached) against a plain loop calling
   ``model.generate`` one prompt at a time, alternated.
3. ``--audit``: the whole ``generative.*`` audit of tiny-diffusion on shapes-gen (trained,
   cached): wall time, and ``image_requests`` (what the checks asked for) against
   ``generated_images`` (what was drawn: each distinct prompt and seed once).

    .venv/bin/python bench/generative.py [--n 2000] [--images 96] [--audit] [--trained]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from mmsafe.data.worlds import load_world
from mmsafe.engine import Engine
from mmsafe.methods.generative.quality import fid, kid, torchmetrics_feature
from mmsafe.models.tiny_diffusion import TinyDiffusion, TinyDiffusionConfig, world_vocab


def bench_metrics(n: int, dim: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    real = torch.tensor(rng.normal(size=(n, dim)))
    fake = torch.tensor(rng.normal(0.2, 1.1, size=(n, dim)))
    ours_s, ref_s, diffs = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours = (fid(real, fake), kid(real, fake, subsets=50, subset_size=min(1000, n), seed=0)[0])
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        ext = torchmetrics_feature(nn.Identity(), num_features=dim)
        m_fid = FrechetInceptionDistance(feature=ext, normalize=True)
        m_kid = KernelInceptionDistance(feature=ext, subsets=50, subset_size=min(1000, n))
        for m in (m_fid, m_kid):
            m.update(real, real=True)
            m.update(fake, real=False)
        torch.manual_seed(0)
        ref = (float(m_fid.compute()), float(m_kid.compute()[0]))
        ref_s.append(time.perf_counter() - t)
        diffs.append(max(abs(a - b) for a, b in zip(ours, ref, strict=True)))
    o, r = float(np.median(ours_s)), float(np.median(ref_s))
    print(f"FID+KID on {n}x{dim} features: mmsafe {o:.3f}s, torchmetrics {r:.3f}s, "
          f"ratio {o / r:.2f}x; largest |difference| {max(diffs):.2e}")  # fmt: skip


def bench_generation(model: TinyDiffusion, n_images: int, repeats: int) -> None:
    prompts = [f"a red circle on the {p}" for p in ("left", "right", "top", "bottom")]
    prompts = (prompts * n_images)[:n_images]
    seeds = list(range(n_images))
    engine_s, loop_s = [], []
    for r in range(repeats):
        engine = Engine(progress=False, batch_size=64)
        t = time.perf_counter()
        batched = engine.generate_images(model, prompts, seeds=[s + r for s in seeds])
        engine_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            looped = torch.cat(
                [model.generate([p], [s + r]) for p, s in zip(prompts, seeds, strict=True)]
            )
        loop_s.append(time.perf_counter() - t)
        assert torch.allclose(batched, looped, atol=1e-4), "batching changed an image"
    e, lo = float(np.median(engine_s)), float(np.median(loop_s))
    print(f"generation, {n_images} images ({model.cfg.steps} steps, guidance "
          f"{model.cfg.guidance}): engine {n_images / e:.1f} img/s, plain loop "
          f"{n_images / lo:.1f} img/s, time ratio {e / lo:.2f}x")  # fmt: skip


def bench_audit() -> None:
    from mmsafe.audit import run_audit
    from mmsafe.models.loading import load_model

    world = load_world("shapes-gen")
    model = load_model("tiny-diffusion", data=world, progress=True)
    t = time.perf_counter()
    card = run_audit(model, world, task="t2i", checks="generative.*",
                     engine=Engine(progress=False)).card  # fmt: skip
    wall = time.perf_counter() - t
    e = card["engine"]
    print(f"generative.* audit: {wall:.0f}s; image requests {e['image_requests']}, images drawn "
          f"{e['generated_images']} (each distinct prompt and seed once)")  # fmt: skip
    for name, entry in card["checks"].items():
        if name.startswith("generative."):
            print(f"  {name}: {entry['status']} ({len(entry['metrics'])} metrics, "
                  f"{len(entry['findings'])} findings)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="rows per feature set")
    p.add_argument("--dim", type=int, default=384, help="feature dimension")
    p.add_argument("--images", type=int, default=96, help="images per generation round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--audit", action="store_true", help="also run the generative.* audit")
    p.add_argument("--trained", action="store_true", help="time the trained (cached) model")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}")
    bench_metrics(args.n, args.dim, args.repeats)
    world = load_world("shapes-gen:n_images=400")
    if args.trained:
        from mmsafe.models.loading import load_model

        model = load_model("tiny-diffusion", data=load_world("shapes-gen"), progress=True)
    else:
        model = TinyDiffusion(TinyDiffusionConfig(vocab=world_vocab(world).tokens)).eval()
    bench_generation(model, args.images, args.repeats)
    if args.audit:
        bench_audit()


if __name__ == "__main__":
    main()
