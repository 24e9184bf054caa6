"""Adaptation methods compared: epoch time, peak memory, trainable params, accuracy, TPME.

One process, up to three backbones, fusion classification on the shapes world (train split ->
test split, OOD rows excluded):

* ``tiny-clip`` (quick-trained on the world, from the model cache);
* a larger, randomly initialised Hugging Face ``CLIPModel`` (ViT + text transformer, byte-level
  tokenizer; no download);
* an *asymmetric* random ``CLIPModel``: a text tower deeper and wider than the vision tower
  (default 8 x 192 vs 4 x 128), for IISAN-Versa.

For the first two: ``full``, ``lora``, ``adapter``, ``iisan`` (cached hidden states, cache build
time reported separately) and ``iisan-uncached`` (the frozen backbones run in every step). For
the asymmetric one: ``full``, ``iisan``, ``iisan-versa`` (same group count G for both towers:
the same taps as ``iisan``), ``iisan-versa-surplus`` (G per tower = ``min(6, depth)``: the
deeper tower's surplus taps run intra-modally first) and ``momef``. The same seed and batch
order, one torch thread, after one discarded warm-up epoch. Prints a Markdown table per
backbone with TPME across the methods compared (paper weights 0.45 / 0.10 / 0.45), and the FFT /
side-method time and memory ratios (paper: 20x time, 15.7x memory on ViT-base + BERT-base, GPU).

With ``--objective retrieval`` the methods are fine-tuned for image-text retrieval instead
(symmetric InfoNCE on the train pairs; R@1/R@5 both ways on every test pair, as the audit's
``performance`` check computes them): ``full``, ``lora``, ``adapter``, ``iisan`` and
``iisan-uncached`` (symmetric backbones) or ``full``, ``iisan``, ``iisan-versa-surplus``
(asymmetric); ``momef`` fuses the modalities and has no retrieval form. The table's quality column
is the mean of image->text and text->image R@1, and a ``zero-shot`` line gives the frozen
model's recalls.

    MMSAFE_CACHE_DIR=/tmp/demo-cache .venv/bin/python bench/adaptation.py [--epochs 2]
    .venv/bin/python bench/adaptation.py --backbones asym   # IISAN-Versa only
    .venv/bin/python bench/adaptation.py --objective retrieval --backbones tiny-clip --epochs 6
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from mmsafe.data.loading import load_data
from mmsafe.methods.adapt import (
    AdaptReport,
    adapt,
    markdown_table,
    tower_layers,
    with_tpme,
    zero_shot_retrieval,
)
from mmsafe.models.hf import CLIP_MEAN, CLIP_STD, HFClip
from mmsafe.models.loading import load_model
from mmsafe.models.tiny_clip import BOS, EOS, PAD, VOCAB_SIZE, tokenize


class ByteTokenizer:
    """tiny-clip's byte tokenizer behind the call signature HFClip uses (no vocabulary file)."""

    model_max_length = 77

    def __call__(self, texts: list[str], *, max_length: int = 77, **_: Any) -> dict[str, Any]:
        return tokenize(texts, max_length)


def random_clip(
    width: int,
    layers: int,
    seed: int = 0,
    *,
    text_width: int | None = None,
    text_layers: int | None = None,
) -> HFClip:
    """A random HF CLIP; ``text_width`` / ``text_layers`` make the text tower differ."""
    import transformers

    def tower(w: int, n: int) -> dict[str, int]:
        return {
            "hidden_size": w,
            "intermediate_size": 4 * w,
            "num_hidden_layers": n,
            "num_attention_heads": 4,
        }

    common = tower(width, layers)
    text = {
        **tower(text_width or width, text_layers or layers),
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 77,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    vision = {**common, "image_size": 32, "patch_size": 4}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
    torch.manual_seed(seed)
    inner = transformers.CLIPModel(cfg)
    return HFClip(
        inner, ByteTokenizer(), source="random-clip", image_mean=CLIP_MEAN, image_std=CLIP_STD
    ).eval()


SYMMETRIC = ("full", "lora", "adapter", "iisan", "iisan-uncached")
ASYMMETRIC = ("full", "iisan", "iisan-versa", "iisan-versa-surplus", "momef")
RETRIEVAL_SYMMETRIC = SYMMETRIC
RETRIEVAL_ASYMMETRIC = ("full", "iisan", "iisan-versa-surplus")


def run_backbone(
    model: Any, train: Any, test: Any, args: argparse.Namespace, methods: tuple[str, ...]
) -> list[AdaptReport]:
    reports = []
    kw = {
        "objective": args.objective,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": 0,
        "threads": 1,
    }
    depth = {m: len(layers) for m, layers in tower_layers(model).items()}
    # Warm-up (discarded): the first training in a process pays one-off allocator growth and
    # lazy initialisation, which would otherwise land on whichever method runs first.
    adapt(model, train, test, "full", **{**kw, "epochs": 1})
    quality = "R@1" if args.objective == "retrieval" else "acc"
    for method in methods:
        t0 = time.perf_counter()
        if method == "iisan-uncached":
            rep = adapt(model, train, test, "iisan", cache=False, **kw).report
            rep = dataclasses.replace(rep, method=method)
        elif method == "iisan-versa-surplus":
            groups = {m: min(6, d) for m, d in depth.items()}
            rep = adapt(model, train, test, "iisan-versa", groups=groups, **kw).report
            rep = dataclasses.replace(rep, method=method)
        else:
            rep = adapt(model, train, test, method, **kw).report
        reports.append(rep)
        print(
            f"  {method:15s} {rep.epoch_seconds:8.3f} s/epoch  {rep.peak_memory_mib:8.1f} MiB  "
            f"{rep.trainable_params:>9d} params  {quality} {rep.accuracy:.3f}  "
            f"(cache {rep.cache_seconds:.2f} s, total {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return with_tpme(reports)


def ratios(reports: list[AdaptReport]) -> str:
    by = {r.method: r for r in reports}
    full = by["full"]
    lines = []
    for name in ("iisan", "iisan-versa", "iisan-versa-surplus", "momef"):
        if name not in by:
            continue
        side = by[name]
        t = full.epoch_seconds / side.epoch_seconds
        m = full.peak_memory_mib / max(side.peak_memory_mib, 1e-9)
        lines.append(
            f"FFT / {name} (cached): time {t:.1f}x, memory {m:.1f}x (paper, IISAN: 20x, 15.7x); "
            f"quality gap FFT - {name} = {full.accuracy - side.accuracy:+.3f}"
        )
    if "iisan-uncached" in by:
        tu = full.epoch_seconds / by["iisan-uncached"].epoch_seconds
        lines.append(f"FFT / IISAN (uncached): time {tu:.1f}x")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="shapes:n=900")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hf-width", type=int, default=128)
    p.add_argument("--hf-layers", type=int, default=4)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument(
        "--backbones",
        default="tiny-clip,hf,asym",
        help="Comma-separated subset of tiny-clip, hf, asym.",
    )
    p.add_argument(
        "--asym-image", default="128x4", help="Asymmetric CLIP vision tower WIDTHxLAYERS."
    )
    p.add_argument("--asym-text", default="192x8", help="Asymmetric CLIP text tower WIDTHxLAYERS.")
    p.add_argument(
        "--objective",
        choices=("classification", "retrieval"),
        default="classification",
        help="Fusion classification (accuracy) or retrieval fine-tuning (R@1/R@5).",
    )
    args = p.parse_args()
    retrieval = args.objective == "retrieval"
    chosen = {b.strip() for b in args.backbones.split(",")}
    if args.skip_hf:
        chosen.discard("hf")
    iw, il = (int(v) for v in args.asym_image.split("x"))
    tw, tl = (int(v) for v in args.asym_text.split("x"))
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, 1 thread, data {args.data}, epochs {args.epochs}, "
        f"batch {args.batch_size}, objective {args.objective}"
    )
    world = load_data(args.data)
    train, test = world.split("train"), world.split("test")
    if retrieval:
        print(f"# train pairs {len(train)}, test pairs {len(test)} (every row)")
    else:
        print(f"# train rows {len(train)}, test rows {int((np.asarray(test.labels) >= 0).sum())}")
    symmetric = RETRIEVAL_SYMMETRIC if retrieval else SYMMETRIC
    asymmetric = RETRIEVAL_ASYMMETRIC if retrieval else ASYMMETRIC
    backbones: list[tuple[str, Any, tuple[str, ...]]] = []
    if "tiny-clip" in chosen:
        backbones.append(
            (
                "tiny-clip",
                lambda: load_model("tiny-clip", data=world, quick=True, progress=False),
                symmetric,
            )
        )
    if "hf" in chosen:
        backbones.append(
            (
                f"random HF CLIP (width {args.hf_width}, {args.hf_layers}+{args.hf_layers} layers)",
                lambda: random_clip(args.hf_width, args.hf_layers),
                symmetric,
            )
        )
    if "asym" in chosen:
        backbones.append(
            (
                f"asymmetric random HF CLIP (vision {iw} x {il} layers, text {tw} x {tl} layers)",
                lambda: random_clip(iw, il, text_width=tw, text_layers=tl),
                asymmetric,
            )
        )
    for name, build, methods in backbones:
        model = build()
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## {name}: {n} backbone parameters\n", flush=True)
        if retrieval:
            zs = zero_shot_retrieval(model, test)
            mean = (zs["i2t_R@1"] + zs["t2i_R@1"]) / 2
            recalls = ", ".join(f"{k} {v:.3f}" for k, v in zs.items())
            print(f"  zero-shot (frozen): R@1 {mean:.3f} ({recalls})", flush=True)
        reports = run_backbone(model, train, test, args, methods)
        print()
        print(markdown_table(reports))
        print()
        print(ratios(reports), flush=True)


if __name__ == "__main__":
    main()
