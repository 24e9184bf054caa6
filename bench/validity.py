"""Validity over many worlds: detection and false-alarm rates of the planted-flaw checks.

Each planted-flaw test in tests/ uses one seed. This benchmark runs every detector of a planted
flaw of the ``shapes`` world over N random worlds that carry the flaw (world ``i`` uses
``seed=i``) and N clean controls (the same world with only that flaw switched off), and prints
per check the detection rate and the false-alarm rate, each with a Wilson 95% interval. Goal (to
report against, not to tune to): detection >= 95% and false alarms <= 5%.

    .venv/bin/python bench/validity.py [--n 20] [--flaws spurious,ood,...] [--seed0 0] [--out DIR]

Worlds are quick: ``shapes:n=900,seed=i`` (the ``mmsafe demo --quick`` world, every flaw knob at
its default, ``train_defects`` too, so tiny-clip learns the defect words zero-shot anomaly
prompts use), and the quick tiny-clip trained on that world serves every check of the world.
Flaws, detectors and decision rules (the check's own finding or documented threshold; the
ground-truth part of the spurious rule is the one of its test):

* ``spurious`` -> ``monitoring.slices``. Detected: the check reports a finding for the slice
  ranked first, and >= 80% of that slice's rows share one (class, background) combination that is
  a rare one (``spurious_aligned`` False) -- tests/test_slices.py:257-277. Control:
  ``spurious=0``, with its own tiny-clip (the flaw lives in the training split); same rule.
* ``label_noise`` -> ``monitoring.label_noise``. Detected / false alarm: a finding (the flagged
  share's CI lower bound above the check's 3%). Control ``label_noise=0``, audited with the
  flawed world's model (the check fits its own probability model on the frozen embeddings).
* ``ood`` -> ``monitoring.ood``. Detected: no "hard to tell apart" finding, i.e. headline AUROC
  >= the check's ``auroc_threshold`` (0.8). Control ``ood=0``: the check skips (no OOD rows), so
  false alarms are not applicable. Also recorded: the test's weaker rule, energy AUROC CI above
  0.5 (tests/test_ood.py:680-692).
* ``defects`` -> ``monitoring.anomaly``. Detected: no "hard to tell" finding, i.e. headline image
  AUROC >= the check's ``auroc_threshold`` (0.8). Control ``defects=0``: the check skips (no
  defective rows): not applicable (tests/test_anomaly.py:486 asserts > 0.9 on a 30% world).
* ``duplicates`` -> ``controllability.privacy``. Detected / false alarm: an "exact copies"
  finding (tests/test_privacy.py:169-193). Control ``duplicates=0,n_duplicated=0``, audited with
  the flawed world's model (the rule reads the training rows' content only, not the model).
* ``caption_label`` -> ``robustness.modality`` (task ``fusion``). The flaw is
  ``caption_label=1.0`` (captions leak the label), the control the default 0.8, both with the
  model trained on the default world, as in tests/test_modality.py:113-133. Detected: a medium or
  high "Over-reliance on text" finding; false alarm: any "Over-reliance" finding.
* ``miscalibration`` -> ``monitoring.calibration``. The flaw is the model's logits x5
  (``TemperatureScaledTask(task, 0.2)``, tests/test_harden_calibration.py:126-135), the control
  the plain model. Detected: an "overconfident" finding (ECE > the check's 0.05); false alarm:
  any calibration finding. The control is the plain model with the temperature fitted on the
  world's calibration split (``mmsafe harden calibration``'s fit): the plain quick tiny-clip is
  itself overconfident (ECE 0.16-0.26 on seeds 0-2), so it would not be a clean control.

Differences from the tests' worlds: the slices test trains one model (``shapes:n=900,
train_defects=0``, seed 0) and evaluates it on 20 worlds of ``n=1500,label_noise=0``; the anomaly
test uses ``n=1500,seed=3,defects=0.3``; the OOD test ``n=3000,seed=5,ood=0.5``; the modality,
privacy and calibration tests use ``shapes:n=900,train_defects=0``. Here every world is
``n=900`` with the default knobs (``train_defects=0.1``), and each world trains its own model.
Check options match the tests where they set them (``n_boot``), which changes only intervals.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmsafe.audit import evaluation_splits, run_audit
from mmsafe.checks import AuditContext
from mmsafe.checks.monitoring.slices import SlicesCheck
from mmsafe.data.dataset import Dataset
from mmsafe.data.loading import load_data
from mmsafe.engine import Engine
from mmsafe.methods.hallucination import wilson_interval
from mmsafe.models.loading import load_model
from mmsafe.tasks import create_task
from mmsafe.tasks.base import TemperatureScaledTask

BASE = "shapes:n=900"
FLAWS: dict[str, str] = {  # flaw -> check
    "spurious": "monitoring.slices",
    "label_noise": "monitoring.label_noise",
    "ood": "monitoring.ood",
    "defects": "monitoring.anomaly",
    "duplicates": "controllability.privacy",
    "caption_label": "robustness.modality",
    "miscalibration": "monitoring.calibration",
}
OPTIONS: dict[str, dict[str, Any]] = {
    "monitoring.anomaly": {"n_boot": 0},
    "robustness.modality": {"n_boot": 200},
    "controllability.privacy": {"n_boot": 200},
}
CLEAN_EVAL = "ood=0,defects=0,label_noise=0"
"""The calibration control's world: the same images and model, with no row that is out of
distribution, defective or mislabelled (each would move the evaluated rows away from the
calibration rows the temperature is fitted on)."""
Outcome = dict[str, Any]  # {"flag": bool | None, "status": str, ...details}


def world(seed: int, extra: str = "") -> Dataset:
    """The quick shapes world of ``seed``, with ``extra`` knobs appended."""
    return load_data(f"{BASE},seed={seed}{',' + extra if extra else ''}")


def audit(model: Any, data: Dataset, check: str, engine: Engine, task: Any = "zero_shot") -> Any:
    """One check's result, through ``run_audit``."""
    opts = {check: OPTIONS[check]} if check in OPTIONS else None
    res = run_audit(model, data, task=task, checks=[check], engine=engine, options=opts)
    return res.results[check]


def skipped(result: Any) -> Outcome | None:
    """``None`` when the check ran; otherwise an outcome with no flag and the reason."""
    if result.status == "ok":
        return None
    return {"flag": None, "status": result.status, "reason": result.reason}


def spurious_rule(model: Any, data: Dataset, engine: Engine) -> Outcome:
    """Slice 1 is reported (a finding) and >= 80% one rare (class, background) combination."""
    result = audit(model, data, "monitoring.slices", engine)
    if (out := skipped(result)) is not None:
        return out
    reported = any(f.evidence.get("rank") == 1 for f in result.findings)
    evaluated, calibration, train = evaluation_splits(data)
    task = create_task("zero_shot")
    task.prepare(model, engine, evaluated.classes, fit_data=train)
    ctx = AuditContext(
        model=model,
        task=task,
        data=evaluated,
        outputs=engine.outputs(model, task, evaluated),
        engine=engine,
        calibration=calibration,
        train=train,
    )
    members = SlicesCheck().discover(ctx).members(1)
    combos = Counter(
        (m["true_shape"], m["tone"], m["spurious_aligned"])
        for m in (evaluated.meta[i] for i in members)
    )
    (shape, tone, aligned), count = combos.most_common(1)[0]
    share = count / max(len(members), 1)
    one_rare = share >= 0.8 and not aligned
    return {
        "flag": bool(reported and one_rare),
        "status": "ok",
        "slice1_reported": reported,
        "slice1_size": len(members),
        "top_combo": f"{shape}/{tone}/{'aligned' if aligned else 'rare'}",
        "top_combo_share": round(share, 3),
        "any_combo_rule": bool(reported and share >= 0.8),  # the rule without "rare"
        "n_findings": len(result.findings),
    }


def ood_rule(model: Any, data: Dataset, engine: Engine) -> Outcome:
    """No "hard to tell apart" finding: headline AUROC >= the check's threshold."""
    result = audit(model, data, "monitoring.ood", engine)
    if (out := skipped(result)) is not None:
        return out
    hard = any("hard to tell apart" in f.message for f in result.findings)
    energy = result.metrics.get("energy/auroc")
    return {
        "flag": not hard,
        "status": "ok",
        "auroc": round(result.metrics["auroc"].value, 3),
        "energy_auroc": None if energy is None else round(energy.value, 3),
        "test_rule_energy_ci_above_half": bool(energy and energy.ci and energy.ci[0] > 0.5),
    }


def defects_rule(model: Any, data: Dataset, engine: Engine) -> Outcome:
    """No "hard to tell" finding: headline image AUROC >= the check's threshold."""
    result = audit(model, data, "monitoring.anomaly", engine)
    if (out := skipped(result)) is not None:
        return out
    hard = any(f.message.startswith("Defective images are hard") for f in result.findings)
    return {
        "flag": not hard,
        "status": "ok",
        "image_auroc": round(result.metrics["image_auroc"].value, 3),
    }


def duplicates_rule(model: Any, data: Dataset, engine: Engine) -> Outcome:
    """An "exact copies" finding."""
    result = audit(model, data, "controllability.privacy", engine)
    if (out := skipped(result)) is not None:
        return out
    dup = result.metrics.get("duplicated_rows")
    return {
        "flag": any("exact copies" in f.message for f in result.findings),
        "status": "ok",
        "duplicated_rows": None if dup is None else int(dup.value),
    }


def label_noise_rule(model: Any, data: Dataset, engine: Engine) -> Outcome:
    """A finding: the flagged share's CI lower bound above the check's medium share."""
    result = audit(model, data, "monitoring.label_noise", engine)
    if (out := skipped(result)) is not None:
        return out
    return {
        "flag": bool(result.findings),
        "status": "ok",
        "flagged_share": round(result.metrics["flagged_share"].value, 4),
        "estimated_noise_rate": round(result.metrics["estimated_noise_rate"].value, 4),
    }


def modality_rule(model: Any, data: Dataset, engine: Engine, flawed: bool) -> Outcome:
    """Flawed: a medium/high "Over-reliance on text" finding; control: any "Over-reliance"."""
    result = audit(model, data, "robustness.modality", engine, task="fusion")
    if (out := skipped(result)) is not None:
        return out
    if flawed:
        flag = any(
            f.message.startswith("Over-reliance on text") and f.severity in ("medium", "high")
            for f in result.findings
        )
    else:
        flag = any(f.message.startswith("Over-reliance") for f in result.findings)
    return {
        "flag": flag,
        "status": "ok",
        "reliance_text": round(result.metrics["reliance/text"].value, 3),
    }


def fitted_temperature(model: Any, data: Dataset, engine: Engine) -> float:
    """The temperature fitted on ``data``'s calibration split (what ``harden calibration`` does)."""
    from mmsafe.harden.calibration import fit_temperature

    _, calibration, train = evaluation_splits(data)
    task = create_task("zero_shot")
    task.prepare(model, engine, data.classes, fit_data=train)
    out = engine.outputs(model, task, calibration)
    return float(fit_temperature(out.logits, out.labels).temperature_)


def calibration_rule(model: Any, data: Dataset, engine: Engine, flawed: bool) -> Outcome:
    """Flawed (logits x5): an "overconfident" finding; control (the plain model with the
    temperature fitted on the calibration split): any calibration finding."""
    temperature = 0.2 if flawed else fitted_temperature(model, data, engine)
    task: Any = TemperatureScaledTask(create_task("zero_shot"), temperature)
    result = audit(model, data, "monitoring.calibration", engine, task=task)
    if (out := skipped(result)) is not None:
        return out
    if flawed:
        flag = any("overconfident" in f.message for f in result.findings)
    else:
        flag = bool(result.findings)
    kinds = [k for f in result.findings for k in ("over", "under") if f"{k}confident" in f.message]
    return {
        "flag": flag,
        "status": "ok",
        "ece": round(result.metrics["ece"].value, 3),
        "kind": kinds[0] + "confident" if kinds else "within threshold",
        "temperature": round(temperature, 3),
    }


def train(data: Dataset) -> Any:
    """The quick tiny-clip trained on ``data`` (cached in $MMSAFE_CACHE_DIR)."""
    return load_model("tiny-clip", data=data, quick=True, progress=False)


def run_world(seed: int, flaws: list[str]) -> dict[str, dict[str, Outcome]]:
    """``{flaw: {"flawed": outcome, "control": outcome}}`` for world ``seed``."""
    base = world(seed)
    model = train(base)
    engine = Engine(progress=False)
    out: dict[str, dict[str, Outcome]] = {}
    plans: dict[str, tuple[Callable[[], Outcome], Callable[[], Outcome]]] = {
        "spurious": (
            lambda: spurious_rule(model, base, engine),
            lambda: _spurious_control(seed),
        ),
        "label_noise": (
            lambda: label_noise_rule(model, base, engine),
            lambda: label_noise_rule(model, world(seed, "label_noise=0"), engine),
        ),
        "ood": (
            lambda: ood_rule(model, base, engine),
            lambda: ood_rule(model, world(seed, "ood=0"), engine),
        ),
        "defects": (
            lambda: defects_rule(model, base, engine),
            lambda: defects_rule(model, world(seed, "defects=0"), engine),
        ),
        "duplicates": (
            lambda: duplicates_rule(model, base, engine),
            lambda: duplicates_rule(model, world(seed, "duplicates=0,n_duplicated=0"), engine),
        ),
        "caption_label": (
            lambda: modality_rule(model, world(seed, "caption_label=1.0"), engine, True),
            lambda: modality_rule(model, base, engine, False),
        ),
        "miscalibration": (
            lambda: calibration_rule(model, base, engine, True),
            lambda: calibration_rule(model, world(seed, CLEAN_EVAL), engine, False),
        ),
    }
    for flaw in flaws:
        if flaw not in plans:
            continue
        flawed, control = plans[flaw]
        out[flaw] = {"flawed": flawed(), "control": control()}
    return out


def _spurious_control(seed: int) -> Outcome:
    control = world(seed, "spurious=0")
    return spurious_rule(train(control), control, Engine(progress=False))


def rate(outcomes: list[Outcome]) -> str:
    """``k/N (rate, [lo, hi])`` over the outcomes that ran; ``n/a`` when none ran."""
    ran = [o for o in outcomes if o["flag"] is not None]
    if not ran:
        reasons = {str(o.get("reason", o["status"])) for o in outcomes}
        return "n/a (skipped: " + "; ".join(sorted(reasons))[:60] + ")"
    k, n = sum(bool(o["flag"]) for o in ran), len(ran)
    lo, hi = wilson_interval(k, n)
    skip = f", {len(outcomes) - n} skipped" if len(outcomes) > n else ""
    return f"{k}/{n} ({k / n:.2f}, [{lo:.2f}, {hi:.2f}]){skip}"


def table(results: dict[int, dict[str, Any]], flaws: list[str], seconds: float) -> str:
    """The markdown table of rates per check."""
    lines = [
        "| check | flaw | detected k/N (rate, Wilson 95% CI) | false alarms k/N (rate, Wilson "
        "95% CI) | s/world |",
        "|---|---|---|---|---|",
    ]
    for flaw in flaws:
        flawed = [r["flaws"][flaw]["flawed"] for r in results.values()]
        control = [r["flaws"][flaw]["control"] for r in results.values()]
        lines.append(
            f"| {FLAWS[flaw]} | {flaw} | {rate(flawed)} | {rate(control)} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="worlds per flaw (and as many controls)")
    ap.add_argument("--flaws", default=",".join(FLAWS), help="comma-separated subset")
    ap.add_argument("--seed0", type=int, default=0, help="first world seed")
    ap.add_argument("--out", type=Path, default=None, help="folder for table.md and worlds.json")
    args = ap.parse_args()
    flaws = [f.strip() for f in args.flaws.split(",") if f.strip()]
    unknown = sorted(set(flaws) - set(FLAWS))
    if unknown:
        ap.error(f"unknown flaws {unknown}; choose from {list(FLAWS)}")
    results: dict[int, dict[str, Any]] = {}
    start = time.perf_counter()
    for seed in range(args.seed0, args.seed0 + args.n):
        t0 = time.perf_counter()
        outcomes = run_world(seed, flaws)
        secs = time.perf_counter() - t0
        results[seed] = {"seconds": round(secs, 1), "flaws": outcomes}
        brief = " ".join(
            f"{f}={_mark(o['flawed'])}/{_mark(o['control'])}" for f, o in outcomes.items()
        )
        print(f"world seed={seed}: {secs:.0f} s  (flawed/control) {brief}", flush=True)
    per_world = (time.perf_counter() - start) / max(args.n, 1)
    md = table(results, flaws, per_world)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(md + "\n")
        (args.out / "worlds.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def _mark(outcome: Outcome) -> str:
    flag = outcome["flag"]
    return "-" if flag is None else "Y" if flag else "n"


if __name__ == "__main__":
    main()
