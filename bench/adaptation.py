"""Adaptation methods compared: epoch time, peak memory, trainable params, accuracy, TPME.

One process, two backbones, fusion classification on the shapes world (train split -> test
split, OOD rows excluded):

* ``tiny-clip`` (quick-trained on the world, from the model cache);
* a larger, randomly initialised Hugging Face ``CLIPModel`` (ViT + text transformer, byte-level
  tokenizer; no download).

For each backbone: ``full``, ``lora``, ``adapter``, ``iisan`` (cached hidden states, cache build
time reported separately) and ``iisan-uncached`` (the frozen backbones run in every step), the
same seed and batch order, one torch thread, after one discarded warm-up epoch. Prints a
Markdown table per backbone with TPME across the methods compared (paper weights 0.45 / 0.10 /
0.45), and the FFT / IISAN time and memory ratios (paper: 20x time, 15.7x memory on ViT-base +
BERT-base, GPU).

    MMSAFE_CACHE_DIR=/tmp/demo-cache .venv/bin/python bench/adaptation.py [--epochs 2]
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

from mmsafe.adapt import AdaptReport, adapt, markdown_table, with_tpme
from mmsafe.loading import load_data, load_model
from mmsafe.models.hf import CLIP_MEAN, CLIP_STD, HFClip
from mmsafe.models.tiny_clip import BOS, EOS, PAD, VOCAB_SIZE, tokenize


class ByteTokenizer:
    """tiny-clip's byte tokenizer behind the call signature HFClip uses (no vocabulary file)."""

    model_max_length = 77

    def __call__(self, texts: list[str], *, max_length: int = 77, **_: Any) -> dict[str, Any]:
        return tokenize(texts, max_length)


def random_clip(width: int, layers: int, seed: int = 0) -> HFClip:
    import transformers

    common = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
    }
    text = {
        **common,
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


def run_backbone(model: Any, train: Any, test: Any, args: argparse.Namespace) -> list[AdaptReport]:
    reports = []
    kw = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0, "threads": 1}
    # Warm-up (discarded): the first training in a process pays one-off allocator growth and
    # lazy initialisation, which would otherwise land on whichever method runs first.
    adapt(model, train, test, "full", **{**kw, "epochs": 1})
    for method in ("full", "lora", "adapter", "iisan", "iisan-uncached"):
        t0 = time.perf_counter()
        if method == "iisan-uncached":
            rep = adapt(model, train, test, "iisan", cache=False, **kw).report
            rep = dataclasses.replace(rep, method=method)
        else:
            rep = adapt(model, train, test, method, **kw).report
        reports.append(rep)
        print(
            f"  {method:15s} {rep.epoch_seconds:8.3f} s/epoch  {rep.peak_memory_mib:8.1f} MiB  "
            f"{rep.trainable_params:>9d} params  acc {rep.accuracy:.3f}  "
            f"(cache {rep.cache_seconds:.2f} s, total {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    return with_tpme(reports)


def ratios(reports: list[AdaptReport]) -> str:
    by = {r.method: r for r in reports}
    full, iisan = by["full"], by["iisan"]
    t = full.epoch_seconds / iisan.epoch_seconds
    m = full.peak_memory_mib / max(iisan.peak_memory_mib, 1e-9)
    tu = full.epoch_seconds / by["iisan-uncached"].epoch_seconds
    return (
        f"FFT / IISAN (cached): time {t:.1f}x, memory {m:.1f}x "
        f"(paper: 20x, 15.7x); FFT / IISAN (uncached): time {tu:.1f}x; "
        f"accuracy gap FFT - IISAN = {full.accuracy - iisan.accuracy:+.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="shapes:n=900")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hf-width", type=int, default=128)
    p.add_argument("--hf-layers", type=int, default=4)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, 1 thread, data {args.data}, epochs {args.epochs}, "
        f"batch {args.batch_size}"
    )
    world = load_data(args.data)
    train, test = world.split("train"), world.split("test")
    print(f"# train rows {len(train)}, test rows {int((np.asarray(test.labels) >= 0).sum())}")
    backbones = [
        ("tiny-clip", lambda: load_model("tiny-clip", data=world, quick=True, progress=False))
    ]
    if not args.skip_hf:
        backbones.append(
            (
                f"random HF CLIP (width {args.hf_width}, {args.hf_layers}+{args.hf_layers} layers)",
                lambda: random_clip(args.hf_width, args.hf_layers),
            )
        )
    for name, build in backbones:
        model = build()
        n = sum(p.numel() for p in model.parameters())
        print(f"\n## {name}: {n} backbone parameters\n", flush=True)
        reports = run_backbone(model, train, test, args)
        print()
        print(markdown_table(reports))
        print()
        print(ratios(reports), flush=True)


if __name__ == "__main__":
    main()
