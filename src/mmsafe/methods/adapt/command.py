"""What ``mmsafe adapt`` runs: method parsing and the command itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmsafe.methods.adapt.compare import compare_methods, default_methods, markdown_table
from mmsafe.methods.adapt.crossan import check_towers, parse_towers, tower_name
from mmsafe.methods.adapt.options import (
    METHODS,
    OBJECTIVES,
    RETRIEVAL_METHODS,
    SEQREC_METHODS,
    TOWER_BLOCK_METHODS,
    AdaptError,
)
from mmsafe.methods.adapt.report import AdaptReport


def parse_methods(spec: str | Sequence[str], objective: str = "classification") -> list[str]:
    """Methods from a comma-separated string (or a list), validated for ``objective``.

    Example:
        >>> parse_methods("full, iisan")
        ['full', 'iisan']
        >>> parse_methods("iisan,momef", objective="retrieval")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmsafe.methods.adapt.options.AdaptError: Method(s) ['momef'] do not support retrieval; ...
    """
    if objective not in OBJECTIVES:
        raise AdaptError(f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}.")
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    methods = [m.strip() for m in items if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AdaptError(f"Unknown method(s) {bad or methods}; choose from {', '.join(METHODS)}.")
    if objective == "retrieval":
        unsupported = [m for m in methods if m not in RETRIEVAL_METHODS]
        if unsupported:
            raise AdaptError(
                f"Method(s) {unsupported} do not support retrieval; choose from "
                f"{', '.join(RETRIEVAL_METHODS)}."
            )
    if objective == "seqrec":
        unsupported = [m for m in methods if m not in SEQREC_METHODS]
        if unsupported:
            raise AdaptError(f"Method(s) {unsupported} do not support seqrec; choose from "
                             f"{', '.join(SEQREC_METHODS)}.")  # fmt: skip
    return list(dict.fromkeys(methods))


def unsupported_methods(model: Any, methods: Sequence[str]) -> dict[str, str]:
    """``{method: why}`` for the methods that cannot reach ``model``'s towers.

    ``adapter`` and the side methods need the tower blocks (``tower_blocks()`` or a known
    layout) and ``hidden_states``; ``lora`` needs linear or dense convolution layers in the
    towers; every method needs an encoder (``kind == "encoder"``).

    Example:
        >>> from mmsafe.models.tiny_clip import TinyClip, TinyClipConfig
        >>> unsupported_methods(TinyClip(TinyClipConfig.for_size("xs")), list(METHODS))
        {}
    """
    from mmsafe.methods.adapt.layers import lora_targets, tower_layers

    name = str(getattr(model, "name", type(model).__name__))
    kind = getattr(model, "kind", "encoder")
    if kind != "encoder":
        return dict.fromkeys(methods, f"{name} is a {kind}, not a dual encoder")
    out: dict[str, str] = {}
    blocks: str | None = None
    try:
        tower_layers(model)
    except AdaptError:
        blocks = f"{name} names no tower blocks (no tower_blocks() and no known layout)"
    if blocks is None and not callable(getattr(model, "hidden_states", None)):
        blocks = f"{name} has no hidden_states"
    for m in methods:
        if m in TOWER_BLOCK_METHODS and blocks is not None:
            out[m] = blocks
        elif m == "lora" and not lora_targets(model):
            out[m] = f"{name} has no linear or dense convolution layer in its towers"
    return out


def check_supported(model: Any, methods: Sequence[str]) -> None:
    """Raise :class:`AdaptError` naming each method ``model`` does not support, and why."""
    bad = unsupported_methods(model, methods)
    if bad:
        why = "; ".join(f"{m}: {r}" for m, r in bad.items())
        ok = [m for m in methods if m not in bad]
        hint = f" Methods that can run: {', '.join(ok)}." if ok else ""
        raise AdaptError(f"Cannot adapt this model with {sorted(bad)} ({why}).{hint}")


def adapt_command(
    model: str = "tiny-clip",
    data: str = "shapes",
    methods: str | Sequence[str] | None = None,
    *,
    objective: str = "classification",
    epochs: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    cache_dir: str | Path | None = None,
    quick: bool = False,
    towers: str | Sequence[str] | None = None,
) -> list[AdaptReport]:
    """What ``mmsafe adapt`` runs: load model and data, compare methods, write the results.

    Trains on the ``train`` split and evaluates on the ``test`` split (its labelled rows for
    classification, every row for retrieval). ``objective="seqrec"`` needs recommendation data
    (``shapes-rec``) and evaluates leave-one-out over every user (the label only at test).
    ``methods=None`` compares every method of the objective. The side methods' hidden states
    are cached (memory-mapped) under ``<cache_dir>/iisan/``. With ``out``, writes
    ``adaptation.json`` and ``adaptation.md`` there.

    ``towers`` (``crossan`` only): ``"MODALITY[@MODEL],..."``, the frozen towers crossan adapts;
    a tower without ``@MODEL`` is ``model``'s, another model is loaded as ``model`` is (e.g.
    ``image,text,image@lit-mini,text@lit-mini``: four towers of two encoders). Default: the
    model's image and text towers.

    Raises:
        AdaptError: an unknown method or objective, a method the objective does not support,
            data without ``train`` and ``test`` splits (classification, retrieval), or data
            that is (seqrec) or is not (the others) recommendation data, ``towers`` without
            ``crossan``, a bad tower, or a model whose towers a method cannot reach.
        DeviceError: the device is not available.
    """
    from mmsafe.data.loading import load_data
    from mmsafe.engine import default_cache_dir, resolve_device
    from mmsafe.engine.cache import atomic_write_text
    from mmsafe.methods.adapt.seqrec import is_rec_data
    from mmsafe.models.loading import load_model

    if objective not in OBJECTIVES:
        raise AdaptError(f"Unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}.")
    chosen = parse_methods(default_methods(objective) if methods is None else methods, objective)
    tower_spec = None
    if towers is not None:
        if "crossan" not in chosen:
            raise AdaptError("--towers chooses crossan's towers; add crossan to --method.")
        tower_spec = parse_towers(towers)
    dev = resolve_device(device)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    ds = load_data(data)
    if objective == "seqrec":
        if not is_rec_data(ds):
            raise AdaptError(
                f"--objective seqrec needs recommendation data (users with a 'sequence' column "
                f"and an item catalog), e.g. --data shapes-rec; {data!r} is not."
            )
        # leave-one-out over every user: train on each history less its last item, validate
        # on that item, test on the label; the encoder is loaded as mm-sasrec loads it
        train, test = ds, ds
        enc = load_model(model, quick=quick, seed=seed, device=str(dev), cache_dir=cache,
                         progress=False)  # fmt: skip
    else:
        if is_rec_data(ds):
            raise AdaptError(
                f"{data!r} is recommendation data (rows are users): use --objective seqrec."
            )
        if not (ds.has_split("train") and ds.has_split("test")):
            raise AdaptError("mmsafe adapt needs data with 'train' and 'test' splits.")
        train, test = ds.split("train"), ds.split("test")
        enc = load_model(
            model, data=ds, quick=quick, seed=seed, device=str(dev), cache_dir=cache,
            progress=False,
        )  # fmt: skip
    check_supported(enc, chosen)
    tower_map = None
    if tower_spec is not None:
        loaded: dict[str, Any] = {}
        for _, spec in tower_spec:
            if spec is not None and spec not in loaded:
                kw = {} if objective == "seqrec" else {"data": ds}
                loaded[spec] = load_model(spec, quick=quick, seed=seed, device=str(dev),
                                          cache_dir=cache, progress=False, **kw)  # fmt: skip
                check_supported(loaded[spec], ["crossan"])
        tower_map = {
            tower_name(m, spec): (enc if spec is None else loaded[spec], m)
            for m, spec in tower_spec
        }
        check_towers(tower_map)
    reports = compare_methods(
        enc,
        train,
        test,
        chosen,
        objective=objective,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        device=str(dev),
        cache_dir=cache,
        **({} if tower_map is None else {"towers": tower_map}),
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "model": model,
            "data": data,
            "objective": objective,
            "towers": None if tower_spec is None else [tower_name(m, t) for m, t in tower_spec],
            "device": str(dev),
            "reports": [r.to_dict() for r in reports],
        }
        atomic_write_text(folder / "adaptation.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(folder / "adaptation.md", markdown_table(reports) + "\n")
    return reports
