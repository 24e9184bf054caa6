"""Behaviour cards: capture audit cards for fixed configurations, then diff two captures.

A refactor that should not change what an audit finds can be checked by capturing the cards of
the same fixed audits with the old and the new code and comparing them::

    # old code (a worktree of the previous commit) and new code, same cache folder
    PYTHONPATH=/path/to/old/src .venv/bin/python bench/behaviour.py capture /tmp/cards-old
    .venv/bin/python bench/behaviour.py capture /tmp/cards-new
    .venv/bin/python bench/behaviour.py compare /tmp/cards-old /tmp/cards-new

``capture OUTDIR`` runs every configuration of :data:`CONFIGS` (tiny-clip, quick training, seed
:data:`SEED`; every task, several shapes worlds, check options, all 14 checks) through
``mmsafe.audit.run_audit`` and writes ``OUTDIR/<config>.json`` (the card dict),
``OUTDIR/configs.json`` (the configuration list) and ``OUTDIR/capture.json`` (which mmsafe ran,
wall times). Models and embeddings are cached in ``$MMSAFE_CACHE_DIR`` (default
``/tmp/mmsafe-behaviour-cache``); captures meant to be compared should share it, so that both
audit the same trained models (training is deterministic, so a cold cache gives the same
cards, only slower). ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (see below). Measured on a
2-core CPU shared with other jobs (load ~20): cold cache 16 min wall (6 CPU-min: 9 trainings),
warm cache 3 min wall (under 1 CPU-min).

``compare OLDDIR NEWDIR`` prints, per configuration, the card sections that differ outside the
volatile parts (:data:`VOLATILE_TOP`, every check's ``seconds``, metrics and plots whose name
contains a :data:`VOLATILE_TOKENS` token, efficiency findings about latency), one line per metric
whose value changed (old value and CI, new value, inside or outside the old CI), the plots and
findings that changed, a summary line per configuration and a grand total. It always exits 0.

Checks are selected by their pre-refactor names through ``checks=`` only; renamed checks are
paired in the diff by :data:`ALIASES`, or else by the last dotted component of the name.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Sleeping (not spinning) OpenMP threads: identical numbers, and on a loaded machine tiny-clip
# training stays ~25 s instead of ~20 min (2 spinning threads per process starve each other).
# Must be set before torch is imported (the mmsafe imports below are lazy for that reason).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ALIASES: dict[str, str] = {
    "calibration": "monitoring.calibration",
    "performance": "performance.classification",
}
"""Old check name -> new check name (the new code keeps the old names as aliases)."""

ALL_CHECKS: tuple[str, ...] = (
    "performance",
    "robustness.adversarial",
    "robustness.modality",
    "robustness.shift",
    "calibration",
    "monitoring.anomaly",
    "monitoring.conformal",
    "monitoring.ood",
    "monitoring.slices",
    "monitoring.uncertainty",
    "controllability.explain",
    "controllability.fairness",
    "controllability.privacy",
    "efficiency.profile",
)
"""The 14 checks, by their pre-refactor names; each appears in at least one configuration."""

VOLATILE_TOP: frozenset[str] = frozenset(
    {"created", "environment", "timings", "engine", "schema_version"}
)
"""Top-level card keys that are not compared."""

VOLATILE_TOKENS: tuple[str, ...] = ("latency", "throughput", "seconds", "s_per", "peak_memory")
"""A metric (or plot) whose name contains one of these is timing, not behaviour.

``peak_memory`` (efficiency.profile ``*/peak_memory_mib``, the process's peak RSS on the CPU) is
here too: two identical captures of the same code differ in it by up to ~20 %.
"""

SEED = 0
MODEL = "tiny-clip"
QUICK_WORLD = "shapes:n=900"
DEFAULT_CACHE = "/tmp/mmsafe-behaviour-cache"
CARD_SKIP = frozenset({"configs.json", "capture.json"})


@dataclass(frozen=True)
class Config:
    """One fixed audit: a world spec, a task, a check selection and per-check options."""

    name: str
    data: str
    task: str
    checks: str | list[str]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


CONFIGS: tuple[Config, ...] = (
    # `mmsafe demo --quick`: every check with its defaults on the quick world.
    Config("zs-quick-all", QUICK_WORLD, "zero_shot", "all"),
    Config(
        "fusion-quick-all",
        QUICK_WORLD,
        "fusion",
        "all",
        {
            "robustness.adversarial": {"max_rows": 64, "steps": 5},
            "robustness.shift": {"severities": [1, 3], "max_rows": 300},
            "controllability.explain": {"max_rows": 64, "ig_rows": 8, "ig_steps": 16},
            "monitoring.anomaly": {"shots": [1, 2], "windows": [12 / 32]},
            "efficiency.profile": {"batch_sizes": [1, 8], "repeats": 2},
        },
    ),
    Config(
        "retrieval-quick",
        QUICK_WORLD,
        "retrieval",
        ["performance", "robustness.adversarial", "robustness.shift", "efficiency.profile"],
        {
            "robustness.adversarial": {"max_rows": 64, "steps": 5, "co_attack": True},
            "robustness.shift": {"severities": [2], "max_rows": 300},
            "efficiency.profile": {"batch_sizes": [1, 8], "repeats": 2},
        },
    ),
    Config(
        "zs-spurious",
        "shapes:n=700,seed=1,spurious=1.0,label_noise=0.0",
        "zero_shot",
        ["performance", "controllability.fairness", "monitoring.slices", "calibration"],
        {
            "calibration": {"n_bins": 10, "n_boot": 100},
            "monitoring.slices": {"n_slices": 8, "top_k": 3},
            "controllability.fairness": {"attributes": ["group", "colour"], "n_boot": 200},
        },
    ),
    Config(
        "zs-label-noise",
        "shapes:n=700,label_noise=0.3",
        "zero_shot",
        ["performance", "controllability.privacy", "monitoring.uncertainty", "calibration"],
        {
            "monitoring.uncertainty": {"n_passes": 4, "n_boot": 200},
            "controllability.privacy": {"n_boot": 200},
        },
    ),
    Config(
        "fusion-ood",
        "shapes:n=700,ood=0.3",
        "fusion",
        ["monitoring.ood", "monitoring.conformal", "performance", "robustness.modality"],
        {
            "monitoring.ood": {"k": 5, "n_boot": 100},
            "monitoring.conformal": {"confidence_level": 0.8, "scores": ["lac", "aps"]},
            "robustness.modality": {"drop": "zeros", "n_boot": 200},
        },
    ),
    Config(
        "zs-defects",
        "shapes:n=700,defects=0.3,train_defects=0.2",
        "zero_shot",
        ["monitoring.anomaly", "robustness.shift", "monitoring.ood"],
        {
            "monitoring.anomaly": {"shots": [1, 2], "windows": [12 / 32], "max_normal": 150},
            "robustness.shift": {
                "image_corruptions": ["gaussian_noise", "defocus_blur", "contrast"],
                "text_perturbations": ["char_swap", "word_drop"],
                "severities": [1, 3, 5],
            },
        },
    ),
    Config(
        "fusion-dups",
        "shapes:n=700,duplicates=10,n_duplicated=30,caption_label=1.0",
        "fusion",
        [
            "controllability.privacy",
            "robustness.modality",
            "controllability.explain",
            "controllability.fairness",
        ],
        {
            "controllability.explain": {"max_rows": 64, "ig_rows": 8, "gradcam": False},
            "controllability.privacy": {"near_duplicate_threshold": 0.99},
        },
    ),
    Config(
        "zs-clean",
        "shapes:n=600,spurious=0.0,label_noise=0.0,ood=0.0,defects=0.0,train_defects=0.0,"
        "duplicates=0,n_duplicated=0",
        "zero_shot",
        [
            "performance",
            "calibration",
            "monitoring.ood",
            "monitoring.anomaly",
            "monitoring.conformal",
            "controllability.privacy",
            "efficiency.profile",
        ],
        {"efficiency.profile": {"batch_sizes": [1, 4], "repeats": 2}},
    ),
    Config(
        "retrieval-noisy",
        "shapes:n=600,pixel_noise=12.0,caption_label=1.0",
        "retrieval",
        ["performance", "robustness.shift", "calibration", "robustness.adversarial"],
        {
            "robustness.adversarial": {
                "norms": ["linf"],
                "attacks": ["pgd"],
                "steps": 3,
                "max_rows": 48,
            },
            "robustness.shift": {"text_perturbations": ["char_drop", "paraphrase"]},
        },
    ),
    Config(
        "zs-seed2-conformal",
        "shapes:n=600,seed=2",
        "zero_shot",
        ["monitoring.conformal", "monitoring.uncertainty", "controllability.explain"],
        {
            "monitoring.conformal": {"mondrian": "group", "randomized": True},
            "controllability.explain": {"max_rows": 64, "ig_rows": 8, "null": "zeros"},
        },
    ),
)


def _covered(configs: Iterable[Config]) -> set[str]:
    out: set[str] = set()
    for c in configs:
        out |= set(ALL_CHECKS) if c.checks == "all" else set(c.checks)
    return out


# ---------------------------------------------------------------------------------- capture
def _runtime_options(options: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The options under the old name and under every check the running code maps it to.

    The old code gets them exactly as written. With the new code an old name may stand for
    renamed or split checks (``resolve_check``, :data:`ALIASES`); each of those also gets the
    options its constructor takes.
    """
    from mmsafe.checks import registry

    known = set(registry.list_checks())
    resolve = getattr(registry, "resolve_check", None)
    out: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        out[name] = dict(opts)
        targets = list(resolve(name)) if resolve is not None else []
        targets.append(_match_name(name, known) or name)
        for target in targets:
            if target == name or target not in known or target in out:
                continue
            params = inspect.signature(registry.get_check(target).__init__).parameters
            taken = {k: v for k, v in opts.items() if k in params}
            if taken:
                out[target] = taken
    return out


def capture(outdir: Path) -> int:
    """Run every configuration and write its card; 1 when one raised or a check failed."""
    import mmsafe
    from mmsafe.audit import run_audit
    from mmsafe.engine.runner import Engine

    try:
        from mmsafe.loading import load_data, load_model
    except ImportError:  # the refactor moved them
        from mmsafe.data.loading import load_data  # type: ignore[no-redef]
        from mmsafe.models.loading import load_model  # type: ignore[no-redef]

    missing = set(ALL_CHECKS) - _covered(CONFIGS)
    if missing:
        raise SystemExit(f"checks in no configuration: {sorted(missing)}")
    cache = Path(os.environ.get("MMSAFE_CACHE_DIR") or DEFAULT_CACHE)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "configs.json").write_text(
        json.dumps([asdict(c) for c in CONFIGS], indent=1) + "\n", "utf-8"
    )
    print(f"mmsafe {getattr(mmsafe, '__version__', '?')} from {Path(mmsafe.__file__).parent}")
    print(f"cache {cache}; seed {SEED}; {len(CONFIGS)} configurations -> {outdir}")
    start, cpu0 = time.perf_counter(), time.process_time()
    seconds: dict[str, float] = {}
    problems = 0
    for cfg in CONFIGS:
        t0 = time.perf_counter()
        try:
            data = load_data(cfg.data)
            model = load_model(
                MODEL, data=data, quick=True, seed=SEED, cache_dir=cache, progress=False
            )
            engine = Engine(progress=False, cache_dir=cache, seed=SEED)
            result = run_audit(
                model,
                data,
                task=cfg.task,
                # a comma-separated string goes through select_checks, as `--checks` does, so
                # the new code expands an old name to every check it stands for
                checks=cfg.checks if isinstance(cfg.checks, str) else ",".join(cfg.checks),
                engine=engine,
                seed=SEED,
                resume=False,
                options=_runtime_options(cfg.options),
            )
            card: dict[str, Any] = result.card
            failed = [n for n, c in card["checks"].items() if c["status"] == "failed"]
            note = f"; FAILED: {', '.join(failed)}" if failed else ""
            problems += bool(failed)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the others
            card = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            note = f"; ERROR {card['error']}"
            problems += 1
        (outdir / f"{cfg.name}.json").write_text(
            json.dumps(card, indent=1, default=str) + "\n", "utf-8"
        )
        seconds[cfg.name] = round(time.perf_counter() - t0, 1)
        statuses = Counter(c["status"] for c in card.get("checks", {}).values())
        print(f"{cfg.name:<20} {seconds[cfg.name]:6.1f} s  {dict(statuses)}{note}", flush=True)
    total = round(time.perf_counter() - start, 1)
    meta = {
        "mmsafe": str(Path(mmsafe.__file__).parent),
        "version": getattr(mmsafe, "__version__", None),
        "python": sys.version.split()[0],
        "cache_dir": str(cache),
        "seconds": seconds,
        "total_seconds": total,
        "cpu_seconds": round(time.process_time() - cpu0, 1),
    }
    (outdir / "capture.json").write_text(json.dumps(meta, indent=1) + "\n", "utf-8")
    print(f"total {total:.1f} s wall, {meta['cpu_seconds']:.1f} s CPU of this process")
    return 1 if problems else 0


# ---------------------------------------------------------------------------------- compare
def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _match_name(name: str, others: Iterable[str]) -> str | None:
    """The name in ``others`` that ``name`` corresponds to (same, alias, or same last part)."""
    pool = set(others)
    if name in pool:
        return name
    reverse = {v: k for k, v in ALIASES.items()}
    for cand in (ALIASES.get(name), reverse.get(name)):
        if cand in pool:
            return cand
    tail = [o for o in pool if _last(o) == _last(name)]
    return tail[0] if len(tail) == 1 else None


def _candidates(name: str, pool: Sequence[str]) -> list[str]:
    """Names in ``pool`` that may be ``name`` renamed or split, most likely first."""
    reverse = {v: k for k, v in ALIASES.items()}
    order = [name, ALIASES.get(name), reverse.get(name)]
    order += [k for k in pool if k.startswith((name + ".", name + "_"))]  # split by task
    order += [k for k in pool if _last(k) == _last(name)]
    out: list[str] = []
    for k in order:
        if k is not None and k in pool and k not in out:
            out.append(k)
    return out


def _pair_checks(
    old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str | None, str | None]]:
    """Pair old and new checks: same name, alias or split; the most shared metric names wins."""
    pairs: list[tuple[str | None, str | None]] = []
    used: set[str] = set()
    for o in old:
        cands = _candidates(o, [k for k in new if k not in used])
        mine = set((old[o] or {}).get("metrics") or {})
        n = max(
            cands,
            key=lambda k: (len(mine & set((new[k] or {}).get("metrics") or {})), -cands.index(k)),
            default=None,
        )
        if n is not None:
            used.add(n)
        pairs.append((o, n))
    pairs += [(None, n) for n in new if n not in used]
    return pairs


def _volatile(name: str) -> bool:
    return any(tok in name for tok in VOLATILE_TOKENS)


def _diff_paths(a: Any, b: Any, path: str) -> list[str]:
    """Paths (``x.y[3]``) at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k} (only new)")
            elif k not in b:
                out.append(f"{path}.{k} (only old)")
            else:
                out += _diff_paths(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            p
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for p in _diff_paths(x, y, f"{path}[{i}]")
        ]
    return [] if _same(a, b) else [path]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)


def _fmt(x: Any) -> str:
    return "None" if x is None else f"{x:.6g}" if isinstance(x, int | float) else repr(x)


def _fmt_ci(ci: Sequence[Any] | None) -> str:
    return "none" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _findings(check: str, c: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = list(c.get("findings") or [])
    if _last(check) == "profile" or check.startswith("efficiency"):
        found = [f for f in found if "latency" not in _canon(f).lower()]
    return found


COUNTS = ("identical", "within-old-CI", "outside-old-CI", "only-old", "only-new")


@dataclass
class Tally:
    """What one comparison found."""

    sections: int = 0
    metrics: Counter[str] = field(default_factory=Counter)
    ci_changed: int = 0
    plots: int = 0
    findings: int = 0

    def add(self, other: Tally) -> None:
        """Accumulate ``other`` into this tally."""
        self.sections += other.sections
        self.metrics.update(other.metrics)
        self.ci_changed += other.ci_changed
        self.plots += other.plots
        self.findings += other.findings

    def line(self) -> str:
        """A one-line summary."""
        m = " / ".join(f"{self.metrics[k]} {k}" for k in COUNTS)
        return (
            f"sections {self.sections}; metrics {m} (CI-only changes {self.ci_changed}); "
            f"plots {self.plots}; findings {self.findings}"
        )


def compare_cards(
    name: str, old: Mapping[str, Any], new: Mapping[str, Any], limit: int
) -> tuple[Tally, list[str]]:
    """Differences between two cards of configuration ``name``, as a tally and report lines."""
    t = Tally()
    lines: list[str] = []
    if "error" in old or "error" in new:
        t.sections += 1
        lines.append(f"  error: old {old.get('error')!r} / new {new.get('error')!r}")
        return t, lines
    # (a) sections outside the checks and the volatile parts
    paths: list[str] = []
    for key in sorted((set(old) | set(new)) - VOLATILE_TOP - {"checks"}):
        if key not in old or key not in new:
            paths.append(f"{key} (only {'new' if key not in old else 'old'})")
        else:
            paths += _diff_paths(old[key], new[key], key)
    metric_lines: list[str] = []
    other: list[str] = []
    for o, n in _pair_checks(old.get("checks", {}), new.get("checks", {})):
        if o is None or n is None:
            side, c = ("new", new["checks"][n]) if o is None else ("old", old["checks"][o])
            paths.append(f"checks.{o or n} (only {side}, {c.get('status')})")
            continue
        co, cn = old["checks"][o], new["checks"][n]
        label = o if o == n else f"{o}->{n}"
        skip = {"metrics", "findings", "plots", "seconds"}
        for key in sorted((set(co) | set(cn)) - skip):
            paths += _diff_paths(co.get(key), cn.get(key), f"checks.{label}.{key}")
        # (b) metrics
        mo = {k: v for k, v in (co.get("metrics") or {}).items() if not _volatile(k)}
        mn = {k: v for k, v in (cn.get("metrics") or {}).items() if not _volatile(k)}
        t.metrics["only-old"] += len(set(mo) - set(mn))
        t.metrics["only-new"] += len(set(mn) - set(mo))
        only = [f"-{k}" for k in sorted(set(mo) - set(mn))] + [
            f"+{k}" for k in sorted(set(mn) - set(mo))
        ]
        if only:
            other.append(f"  metrics only on one side {label}: {' '.join(only[:12])}")
        for k in sorted(set(mo) & set(mn)):
            vo, vn = mo[k].get("value"), mn[k].get("value")
            ci = mo[k].get("ci")
            if _same(vo, vn):
                t.metrics["identical"] += 1
                t.ci_changed += _canon(ci) != _canon(mn[k].get("ci"))
                continue
            inside = (
                ci is not None and None not in ci and vn is not None and min(ci) <= vn <= max(ci)
            )
            t.metrics["within-old-CI" if inside else "outside-old-CI"] += 1
            delta = f" d{vn - vo:+.3g}" if vo is not None and vn is not None else ""
            metric_lines.append(
                f"  {label} {k}: old {_fmt(vo)} CI {_fmt_ci(ci)} new {_fmt(vn)}{delta} "
                f"{'within' if inside else 'OUTSIDE'}"
            )
        # (c) plots and findings
        po = {k: v for k, v in (co.get("plots") or {}).items() if not _volatile(k)}
        pn = {k: v for k, v in (cn.get("plots") or {}).items() if not _volatile(k)}
        bad = sorted(k for k in set(po) | set(pn) if _canon(po.get(k)) != _canon(pn.get(k)))
        if bad:
            t.plots += len(bad)
            other.append(f"  plots differ {label} ({len(bad)}): {', '.join(bad)}")
        fo = Counter(_canon(f) for f in _findings(o, co))
        fn = Counter(_canon(f) for f in _findings(n, cn))
        gone, came = fo - fn, fn - fo
        if gone or came:
            t.findings += max(sum(gone.values()), sum(came.values()))
            msgs = [f"-{json.loads(f).get('message', '')[:60]!r}" for f in gone] + [
                f"+{json.loads(f).get('message', '')[:60]!r}" for f in came
            ]
            other.append(
                f"  findings differ {label} (-{sum(gone.values())} +{sum(came.values())}): "
                + "; ".join(msgs[:6])
                + (" ..." if len(msgs) > 6 else "")
            )
    t.sections = len(paths)
    if paths:
        shown = ", ".join(paths[:10]) + (f", ... {len(paths) - 10} more" if len(paths) > 10 else "")
        lines.append(f"  sections differ ({len(paths)}): {shown}")
    cut = metric_lines if limit <= 0 else metric_lines[:limit]
    lines += cut
    if len(cut) < len(metric_lines):
        lines.append(f"  ... {len(metric_lines) - len(cut)} more differing metrics (--limit)")
    lines += other
    return t, lines


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _config_names(*dirs: Path) -> list[str]:
    names: list[str] = []
    for d in dirs:
        listed = _load(d / "configs.json")
        found = [c["name"] for c in listed] if isinstance(listed, list) else []
        found += sorted(p.stem for p in d.glob("*.json") if p.name not in CARD_SKIP)
        for n in found:
            if n not in names:
                names.append(n)
    return names


def compare(olddir: Path, newdir: Path, limit: int = 50) -> int:
    """Print the report of ``olddir`` vs ``newdir``; always 0."""
    total = Tally()
    changed = 0
    names = _config_names(olddir, newdir)
    for name in names:
        old, new = _load(olddir / f"{name}.json"), _load(newdir / f"{name}.json")
        if old is None or new is None:
            where = "both" if old is None and new is None else "old" if old is None else "new"
            print(f"{name}: card missing or unreadable in {where}")
            changed += 1
            continue
        tally, lines = compare_cards(name, old, new, limit)
        total.add(tally)
        differing = sum(v for k, v in tally.metrics.items() if k != "identical")
        clean = not lines and not differing and not tally.ci_changed
        changed += not clean
        same = f"identical ({tally.metrics['identical']} metrics)"
        print(f"{name}: {same if clean else tally.line()}")
        for line in lines:
            print(line)
    print(f"TOTAL {len(names)} configs, {changed} with differences: {total.line()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("capture", help="write one card per configuration into OUTDIR")
    cap.add_argument("outdir", type=Path)
    cmp_ = sub.add_parser("compare", help="diff the cards of two captures")
    cmp_.add_argument("olddir", type=Path)
    cmp_.add_argument("newdir", type=Path)
    cmp_.add_argument(
        "--limit", type=int, default=50, help="differing-metric lines per config (0: all)"
    )
    args = parser.parse_args(argv)
    if args.command == "capture":
        return capture(args.outdir)
    return compare(args.olddir, args.newdir, args.limit)


if __name__ == "__main__":
    sys.exit(main())
