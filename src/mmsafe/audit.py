"""One call audits a model: ``run_audit(model, data) -> AuditResult``.

The audit picks the evaluation rows (the ``test`` split when there is one), prepares the task,
has the engine compute the clean outputs once, runs every selected check on them, and writes
``card.json`` and ``index.html`` atomically.

Each finished check is saved at once under ``<out>/.mmsafe/checks/`` with a key made of the model,
data, task, check configuration and seed. Running the same audit again (after Ctrl-C, a crash or
a power cut) reuses every finished check and runs only the rest; the card it writes equals an
uninterrupted run's outside the ``timings`` and ``environment`` sections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from mmsafe import __version__
from mmsafe.checks import AuditContext, CheckResult, get_check, select_checks
from mmsafe.data.dataset import Dataset
from mmsafe.engine.cache import atomic_write_json, atomic_write_text, stable_hash
from mmsafe.engine.runner import Engine, set_seed
from mmsafe.models.base import EncoderModel
from mmsafe.report.card import build_card, validate_card
from mmsafe.report.gates import Gate, GateOutcome, evaluate_gates
from mmsafe.report.html import write_html
from mmsafe.tasks.base import Task, create_task

STATE_DIR = ".mmsafe"
LOG_NAME = "mmsafe.log"


@dataclass
class AuditResult:
    """What an audit produced.

    Attributes:
        card: the card dict (as written to ``card.json``).
        results: ``{check name: CheckResult}``.
        gates: the verdict of every ``--fail-on`` gate.
        out: the report folder, when one was written.
        resumed: names of the checks reused from an earlier, interrupted run.
    """

    card: dict[str, Any]
    results: dict[str, CheckResult]
    gates: list[GateOutcome] = field(default_factory=list)
    out: Path | None = None
    resumed: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 ok; 1 a gate failed; 3 a check failed internally (see the log)."""
        if any(r.status == "failed" for r in self.results.values()):
            return 3
        return 1 if any(g.failed for g in self.gates) else 0


def _status(console: Console, text: str) -> contextlib.AbstractContextManager[Any]:
    """A spinner on an interactive console; nothing on a quiet one or a pipe (no thread)."""
    if console.quiet or not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(text)


def evaluation_splits(data: Dataset) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """``(evaluated, calibration, train)``: the test split (or every row) and the others if any.

    Example:
        >>> import numpy as np
        >>> ds = Dataset("d", ["a", "b", "c"], {"text": ["x", "y", "z"]}, np.array([0, 1, 0]),
        ...              ["n", "y"], splits=["train", "test", "test"])
        >>> ev, cal, tr = evaluation_splits(ds)
        >>> ev.ids, cal, tr.ids
        (['b', 'c'], None, ['a'])
    """
    evaluated = data.split("test") if data.has_split("test") else data
    calibration = data.split("calibration") if data.has_split("calibration") else None
    train = data.split("train") if data.has_split("train") else None
    return evaluated, calibration, train


@functools.cache
def code_digest() -> str:
    """A digest of mmsafe's own source files.

    Part of every resume key, so a resumed audit never reuses a result that older code computed
    (after an upgrade, or while a check is being developed).
    """
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.relative_to(Path(__file__).parent).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def check_key(name: str, config: Mapping[str, Any], fingerprints: Sequence[str], seed: int) -> str:
    """The key under which a finished check is saved for resuming.

    It holds the check's name and options, the model/data/task fingerprints, the seed, and the
    mmsafe version and source digest (:func:`code_digest`).
    """
    return stable_hash(
        "check", __version__, code_digest(), name, dict(config), list(fingerprints), seed
    )


def _load_finished(path: Path, key: str) -> CheckResult | None:
    try:
        saved = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if saved.get("key") != key:
        return None
    return CheckResult.from_dict(saved["name"], saved["result"], saved.get("timings"))


def run_audit(
    model: EncoderModel,
    data: Dataset,
    *,
    task: str | Task = "zero_shot",
    checks: str | Sequence[str] = "all",
    out: str | Path | None = None,
    engine: Engine | None = None,
    seed: int = 0,
    gates: Sequence[Gate] = (),
    resume: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    console: Console | None = None,
) -> AuditResult:
    """Audit ``model`` on ``data`` and (when ``out`` is given) write the card.

    Args:
        model: the encoder under audit.
        data: all rows; the ``test`` split is evaluated when there is one, ``train`` fits
            what a task learns and ``calibration`` serves checks that need it.
        task: a task name or a :class:`Task`.
        checks: glob patterns (``"monitoring.*,performance"``), ``"all"``, or a list of names.
        out: the report folder; ``None`` writes nothing and cannot resume.
        engine: batching, device and cache; a CPU engine with an in-memory cache by default.
        seed: seeds every random choice of the audit.
        gates: ``--fail-on`` gates evaluated on the card.
        resume: reuse checks finished by an earlier run with the same key.
        options: per-check keyword arguments, ``{check name: {arg: value}}``.
        console: where to print progress (a quiet console by default).

    Returns:
        An :class:`AuditResult`; its ``exit_code`` is what the CLI exits with.
    """
    start = time.perf_counter()
    console = console or Console(quiet=True)
    engine = engine or Engine(progress=False)
    options = {k: dict(v) for k, v in (options or {}).items()}
    task = create_task(task) if isinstance(task, str) else task
    names = select_checks(checks) if isinstance(checks, str) else list(checks)
    out_dir = None if out is None else Path(out)
    state = None if out_dir is None else out_dir / STATE_DIR / "checks"

    if out_dir is not None:
        _remove_partial_writes(out_dir)
    set_seed(seed)
    evaluated, calibration, train = evaluation_splits(data)
    task.check_data(evaluated)
    with _status(console, f"preparing task {task.name}"):
        task.prepare(model, engine, evaluated.classes, fit_data=train)
        outputs = engine.outputs(model, task, evaluated)
    ctx = AuditContext(
        model=model,
        task=task,
        data=evaluated,
        outputs=outputs,
        engine=engine,
        seed=seed,
        calibration=calibration,
        train=train,
    )
    data_fp = data.fingerprint()
    fingerprints = [model.fingerprint(), data_fp, task.fingerprint()]
    results: dict[str, CheckResult] = {}
    resumed: list[str] = []
    for name in names:
        config = options.get(name, {})
        key = check_key(name, config, fingerprints, seed)
        saved_path = None if state is None else state / f"{name}.json"
        if resume and saved_path is not None and saved_path.exists():
            previous = _load_finished(saved_path, key)
            if previous is not None:
                results[name] = previous
                resumed.append(name)
                console.print(f"[dim]↻ {name}: reused from the interrupted run[/dim]")
                continue
        result = _run_one(name, config, ctx, out_dir, console)
        results[name] = result
        if saved_path is not None and result.status != "failed":
            saved = {"key": key, "name": name, "result": result.to_dict()}
            # a resume cache: atomic, but not fsynced (an entry lost to a power cut is a miss)
            state_doc = {**saved, "timings": result.timings_dict()}
            atomic_write_json(saved_path, state_doc, durable=False)

    card = build_card(
        model=model,
        data=data,
        evaluated=evaluated,
        task=task,
        results=results,
        seed=seed,
        device=str(engine.device),
        data_fingerprint=data_fp,
        total_seconds=time.perf_counter() - start,
        reused=resumed,
        engine=engine.accounting(),
    )
    for name in results:  # what was asked of each check, for reproducing the card
        if options.get(name):
            card["checks"][name]["options"] = json.loads(json.dumps(options[name], default=str))
    outcomes = evaluate_gates(gates, card)
    card["gates"] = [
        {"gate": g.gate, "failed": g.failed, "value": g.value, "message": g.message}
        for g in outcomes
    ]
    validate_card(card)
    if out_dir is not None:
        atomic_write_json(out_dir / "card.json", card)
        write_html(card, out_dir / "index.html")
    return AuditResult(card=card, results=results, gates=outcomes, out=out_dir, resumed=resumed)


def _run_one(
    name: str,
    config: Mapping[str, Any],
    ctx: AuditContext,
    out_dir: Path | None,
    console: Console,
) -> CheckResult:
    """Run one check; a crash becomes a ``failed`` result with the traceback in the log."""
    cls = get_check(name)
    check = cls(**config)
    ctx = dataclasses.replace(ctx, check=name)
    reason = check.skip_reason(ctx)
    if reason is not None:
        console.print(f"[yellow]– {name}: skipped ({reason})[/yellow]")
        return CheckResult(name=name, pillar=cls.pillar, status="skipped", reason=reason)
    start = time.perf_counter()
    try:
        with _status(console, f"running {name}"):
            result = check.run(ctx)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - isolate one check's crash from the audit
        log = _log_failure(out_dir, name, exc)
        where = f"; traceback in {log}" if log else ""
        console.print(f"[red]✗ {name}: failed ({type(exc).__name__}: {exc}){where}[/red]")
        return CheckResult(
            name=name,
            pillar=cls.pillar,
            status="failed",
            reason=f"internal error: {type(exc).__name__}: {exc}{where}",
        )
    seconds = time.perf_counter() - start
    console.print(f"[green]✓ {name}[/green] [dim]({seconds:.2f} s)[/dim]")
    return replace(result, seconds=seconds)


def _remove_partial_writes(out_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run left in the report folder.

    They are named ``.<file>.<random>.tmp`` (:func:`mmsafe.engine.cache.atomic_write`); a run
    killed mid-write (SIGKILL, power cut) cannot delete its own.
    """
    for folder in (out_dir, out_dir / STATE_DIR / "checks"):
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def _log_failure(out_dir: Path | None, name: str, exc: BaseException) -> Path | None:
    if out_dir is None:
        return None
    log = out_dir / LOG_NAME
    previous = log.read_text("utf-8") if log.exists() else ""
    tb = "".join(traceback.format_exception(exc))
    atomic_write_text(log, previous + f"--- check {name} failed ---\n{tb}\n")
    return log
