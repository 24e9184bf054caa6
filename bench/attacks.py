"""mmsafe PGD vs torchattacks PGD: time and robust accuracy, same model, rows, budget and steps.

Two models, one process, CPU:

* **tiny-clip** (quick, trained on the quick shapes world; loaded from the cache or trained once
  before timing), zero-shot on the labelled test rows;
* **hf-clip-random**: a randomly initialised transformers ``CLIPModel`` (ViT, sizes below) behind
  :class:`mmsafe.models.hf.HFClip`, zero-shot against random unit class embeddings, with random
  labels (so most rows start misclassified, as for a weak model), and again with the clean
  predictions as labels (every row starts correct, so only early stopping saves time).

Three runs per model, L-inf eps 4/255, 10 steps, step 2.5 * eps / steps, random start:

* ``torchattacks``: ``torchattacks.PGD`` on every row (it has no notion of cached outputs);
* ``mmsafe-plain``: :func:`mmsafe.methods.attacks.pixel.pgd` on every row (same algorithm, per-step
parity);
* ``mmsafe``: :func:`mmsafe.methods.attacks.pixel.run_attack` as the check calls it: rows the
cached clean
  logits already misclassify are skipped, and ``early_stop`` drops a row at its first
  misclassifying iterate.

Prints seconds, robust accuracy, the time ratio mmsafe / torchattacks and the robust-accuracy
difference. Goal: ratio <= 0.8 at equal robust accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attacks.py [--cache-dir DIR] [--hf-rows 32]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from mmsafe.data.loading import load_data
from mmsafe.methods.attacks.pixel import pgd, pixel_forward, run_attack
from mmsafe.models.hf import CLIP_MEAN, CLIP_STD, HFClip
from mmsafe.models.loading import load_model
from mmsafe.tasks import create_task

EPS, STEPS = 4 / 255, 10


class _Net(nn.Module):
    def __init__(self, forward: Callable[[Tensor], Tensor], model: nn.Module) -> None:
        super().__init__()
        self.model, self.fwd = model, forward

    def forward(self, x: Tensor) -> Tensor:
        return self.fwd(x)


def _acc(forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((forward(x).argmax(-1) == y).float().mean())


def compare(name: str, model: nn.Module, forward, x: Tensor, y: Tensor) -> dict[str, float]:
    """Time the three runs on the same rows and print one block."""
    import torchattacks

    with torch.no_grad():
        clean_logits = forward(x)  # stands in for the engine's cached clean outputs
    clean = float((clean_logits.argmax(-1) == y).float().mean())
    net = _Net(forward, model).eval()
    ref = torchattacks.PGD(net, eps=EPS, alpha=2.5 * EPS / STEPS, steps=STEPS, random_start=True)
    torch.manual_seed(0)
    runs: dict[str, Callable[[], Tensor]] = {
        "torchattacks": lambda: ref(x, y),
        "mmsafe-plain": lambda: pgd(forward, x, y, EPS, steps=STEPS,
                                    generator=torch.Generator().manual_seed(0)),
        "mmsafe": lambda: run_attack("pgd", forward, x, y, EPS, "linf", steps=STEPS,
                                     generator=torch.Generator().manual_seed(0),
                                     clean_logits=clean_logits, early_stop=True),
    }  # fmt: skip
    secs, accs = {}, {}
    for key, fn in runs.items():
        t0 = time.perf_counter()
        adv = fn()
        secs[key] = time.perf_counter() - t0
        accs[key] = _acc(forward, adv, y)
    print(f"\n== {name}: {len(y)} rows, clean accuracy {clean:.3f}, eps 4/255, {STEPS} steps")
    for key in runs:
        print(f"  {key:13s} {secs[key]:7.2f} s   robust accuracy {accs[key]:.3f}")
    for key in ("mmsafe-plain", "mmsafe"):
        print(
            f"  {key} / torchattacks: time x{secs[key] / secs['torchattacks']:.2f}, "
            f"robust accuracy {accs[key] - accs['torchattacks']:+.3f}"
        )
    return {
        "ratio": secs["mmsafe"] / secs["torchattacks"],
        "diff": accs["mmsafe"] - accs["torchattacks"],
    }


def tiny_clip_case(cache_dir: str | None) -> tuple:
    world = load_data("shapes:n=900,train_defects=0")
    model = load_model("tiny-clip", data=world, quick=True, cache_dir=cache_dir, progress=False)
    model = model.eval()
    from mmsafe.engine import Engine

    test = world.split("test")
    keep = np.flatnonzero(test.labels >= 0)
    task = create_task("zero_shot")
    task.prepare(model, Engine(progress=False), test.classes)
    x = model.preprocess("image", [test.modalities["image"][i] for i in keep])
    y = torch.as_tensor(test.labels[keep], dtype=torch.long)
    return model, pixel_forward(model, task), x, y


def hf_case(rows: int) -> tuple:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        vision_config={"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                       "num_attention_heads": 6, "image_size": 112, "patch_size": 16},
        projection_dim=256,
    )  # fmt: skip
    model = HFClip(CLIPModel(cfg), None, source="random-init", image_mean=CLIP_MEAN,
                   image_std=CLIP_STD).eval()  # fmt: skip
    task = create_task("zero_shot")
    g = torch.Generator().manual_seed(0)
    task.class_embeddings_ = nn.functional.normalize(torch.randn(10, 256, generator=g), dim=-1)
    task.logit_scale_ = 100.0
    x = torch.rand(rows, 3, 112, 112, generator=g)
    y = torch.randint(0, 10, (rows,), generator=g)
    return model, pixel_forward(model, task), x, y


def main() -> None:
    """Run both cases and print the summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None, help="mmsafe model cache (tiny-clip)")
    ap.add_argument("--hf-rows", type=int, default=32, help="images for the HF CLIP case")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor()}")
    out = {"tiny-clip": compare("tiny-clip (quick)", *tiny_clip_case(args.cache_dir))}
    out["hf-clip-random"] = compare(
        "HF CLIP, random init (ViT 6x384, 112 px, patch 16)", *hf_case(args.hf_rows)
    )
    model, forward, x, _ = hf_case(args.hf_rows)
    with torch.no_grad():
        y_pred = forward(x).argmax(-1)  # every row starts correct: only early stop helps
    out["hf-clip-random, all correct"] = compare(
        "HF CLIP, random init, labels = clean predictions", model, forward, x, y_pred
    )
    print("\nsummary (mmsafe with skip + early stop vs torchattacks):")
    for k, v in out.items():
        print(f"  {k:28s} time x{v['ratio']:.2f}  robust accuracy {v['diff']:+.3f}")


if __name__ == "__main__":
    main()
