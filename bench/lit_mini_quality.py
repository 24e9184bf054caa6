"""lit-mini vs tiny-clip: zero-shot accuracy on the default shapes world's test split.

Both models train on the same world's train split (or load from the cache) and are scored by
the same function, ``heldout_zero_shot_accuracy`` (the mean of three prompt embeddings per
class, the labelled test rows). ``--sizes`` also trains lit-mini at other input sizes (its
heads only; the towers are the same), which is how its default of 96 px was chosen; the time
of one pass of the image tower over the world's 3,000 images is printed beside each size.
Goal: lit-mini >= tiny-clip (0.93).

    .venv/bin/python bench/lit_mini_quality.py [--sizes 64,80,96,128] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

from mmsafe.data.worlds.shapes import make_shapes
from mmsafe.models.lit_mini import LitMiniConfig, build_lit_mini, image_features
from mmsafe.models.tiny_clip import build_tiny_clip, heldout_zero_shot_accuracy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="", help="comma-separated lit-mini input sizes to try too")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    world = make_shapes()
    tiny = build_tiny_clip("s", train_data=world, seed=args.seed, progress=False)
    print(
        f"tiny-clip (s): zero-shot {heldout_zero_shot_accuracy(tiny, world):.4f} "
        f"(trained in {tiny.training_info.get('train_seconds', '?')} s when first built)"
    )
    default = LitMiniConfig().input_size
    sizes = [default, *(int(s) for s in args.sizes.split(",") if s and int(s) != default)]
    for size in sizes:
        cfg = LitMiniConfig(input_size=size)
        lit = build_lit_mini(world, seed=args.seed, progress=False, config=cfg)
        info = lit.training_info
        start = time.perf_counter()
        with torch.inference_mode():
            image_features(lit, world.modalities["image"])
        sweep = time.perf_counter() - start
        print(
            f"lit-mini {size:>3} px{' (default)' if size == default else ''}: zero-shot "
            f"{heldout_zero_shot_accuracy(lit, world):.4f}; heads trained in "
            f"{info.get('train_seconds', '?')} s ({info.get('feature_seconds', '?')} s of tower "
            f"features) when first built; image tower over {len(world)} images: {sweep:.1f} s"
        )


if __name__ == "__main__":
    main()
