"""What ``mmsafe adapt`` runs: method parsing and the command itself."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mmsafe.methods.adapt.compare import compare_methods, default_methods, markdown_table
from mmsafe.methods.adapt.options import METHODS, OBJECTIVES, RETRIEVAL_METHODS, SEQREC_METHODS
from mmsafe.methods.adapt.report import AdaptReport


class AdaptError(ValueError):
    """``mmsafe adapt`` cannot run as asked (unknown method, data without splits)."""


def parse_methods(spec: str | Sequence[str], objective: str = "classification") -> list[str]:
    """Methods from a comma-separated string (or a list), validated for ``objective``.

    Example:
        >>> parse_methods("full, iisan")
        ['full', 'iisan']
        >>> parse_methods("iisan,momef", objective="retrieval")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mmsafe.methods.adapt.command.AdaptError: Method(s) ['momef'] do not support retrieval; ...
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
) -> list[AdaptReport]:
    """What ``mmsafe adapt`` runs: load model and data, compare methods, write the results.

    Trains on the ``train`` split and evaluates on the ``test`` split (its labelled rows for
    classification, every row for retrieval). ``objective="seqrec"`` needs recommendation data
    (``shapes-rec``) and evaluates leave-one-out over every user (the label only at test).
    ``methods=None`` compares every method of the objective. The side methods' hidden states
    are cached (memory-mapped) under ``<cache_dir>/iisan/``. With ``out``, writes
    ``adaptation.json`` and ``adaptation.md`` there.

    Raises:
        AdaptError: an unknown method or objective, a method the objective does not support,
            data without ``train`` and ``test`` splits (classification, retrieval), or data
            that is (seqrec) or is not (the others) recommendation data.
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
    )
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {
            "model": model,
            "data": data,
            "objective": objective,
            "device": str(dev),
            "reports": [r.to_dict() for r in reports],
        }
        atomic_write_text(folder / "adaptation.json", json.dumps(doc, indent=2, default=str) + "\n")
        atomic_write_text(folder / "adaptation.md", markdown_table(reports) + "\n")
    return reports
