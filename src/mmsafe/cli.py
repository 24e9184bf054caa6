"""The ``mmsafe`` command line: ``demo``, ``audit``, ``list-checks``, ``list-models``.

Exit codes of ``audit`` and ``demo``: 0 ok; 1 a ``--fail-on`` gate failed; 2 user error (bad
input, bad flag); 3 internal error, with a pointer to the log file.

After ``audit``, ``demo`` and ``harden`` the terminal summary (:func:`_summary`) leads with a
verdict per pillar and the top findings, and fits 80 columns. ``--json`` prints the card as
JSON on stdout and nothing else (progress and the summary go to stderr); ``--quiet`` prints
nothing on stdout (but the JSON of ``--json``): errors and failed gates go to stderr, and the
exit code is unchanged.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from mmsafe import __version__

app = typer.Typer(
    name="mmsafe",
    help="Audit multimodal models (CLIP/SigLIP-style) and write a safety card: HTML + JSON + "
    "CI gates. Start with `mmsafe demo`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)

QUICK_WORLD = "shapes:n=900"


def _loading_errors() -> tuple[type[Exception], ...]:
    """The errors of ``--data`` and ``--model`` that are the user's to fix (exit 2)."""
    from mmsafe.data.loading import DataSpecError
    from mmsafe.data.manifest import ManifestError
    from mmsafe.data.worlds import WorldSpecError
    from mmsafe.models.base import ModelError

    return (DataSpecError, ManifestError, WorldSpecError, ModelError)


def _user_error(message: str) -> typer.Exit:
    # escaped: a message's own brackets ("mmsafe[ray]", paths) are text, not rich markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False)
    return typer.Exit(2)


def _internal_error(exc: BaseException, out: Path) -> typer.Exit:
    log = out / "mmsafe.log"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as fh:
            fh.write("".join(traceback.format_exception(exc)))
        where = f"The traceback is in {log}."
    except OSError:
        where = "The log could not be written; the traceback follows.\n" + "".join(
            traceback.format_exception(exc)
        )
    err_console.print(
        f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc}\n{where} Please "
        "report it with that file.",
        highlight=False,
    )
    return typer.Exit(3)


_VERDICT_STYLE = {"fail": "bold red", "warn": "bold yellow", "pass": "bold green", "skipped": "dim"}
_VERDICT_WORD = {"fail": "FAIL", "warn": "WARN", "pass": "PASS", "skipped": "SKIP"}
_STATUS_STYLE = {"ok": "green", "skipped": "yellow", "failed": "red"}
_SEVERITY_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}
TOP_FINDINGS = 5
"""How many findings the terminal summary lists under "Top findings"."""


def _block(console: Console, text: Text, indent: int = 0) -> None:
    """Print ``text`` wrapped to the console's width, every line indented by ``indent``.

    ``text`` is a :class:`~rich.text.Text`, never markup: user strings (check names, messages,
    paths) are printed literally, brackets included. Words longer than a line are folded, never
    cut off.
    """
    pad = Text(" " * indent)
    for line in text.wrap(console, max(console.width - indent, 1), overflow="fold"):
        line.rstrip()
        console.print(pad + line, highlight=False, crop=False, soft_wrap=True)


def _number(value: float) -> str:
    """A metric value for the summary: 3 decimals, or 4 significant digits when large."""
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def _first_metric(metrics: dict) -> str:
    """The first metric with a value, as ``label value [lo, hi]``, and how many more there are."""
    from mmsafe.report.overview import metric_label

    shown = [(k, v) for k, v in metrics.items() if v.get("value") is not None]
    if not shown:
        return ""
    key, m = shown[0]
    text = f"{metric_label(key)} {_number(m['value'])}"
    ci = m.get("ci")
    if ci and None not in ci:
        text += f" [{_number(ci[0])}, {_number(ci[1])}]"
    if len(shown) > 1:
        text += f" (+{len(shown) - 1} more)"
    return text


def _counts(counts: dict[str, int]) -> str:
    """``3 checks: 2 ok, 1 skipped``."""
    n = sum(counts.values())
    parts = [f"{counts[s]} {s}" for s in ("ok", "failed", "skipped") if counts.get(s)]
    parts += [f"{v} {s}" for s, v in counts.items() if s not in ("ok", "failed", "skipped")]
    return f"{n} check{'s' if n != 1 else ''}: {', '.join(parts)}"


def _summary(card: dict, out: Path | None, console: Console | None = None) -> None:
    """The terminal summary of a card: readable at 80 columns, never a truncated check name.

    First a verdict per pillar (see :mod:`mmsafe.report.overview`), then the top findings with
    their remediation, then one entry per check (status and name on one line, the first metric
    or the skip reason below), the gates, skipped rows and where the report is.

    Args:
        card: The card dict (as written to ``card.json``).
        out: The report folder (``None``: no paths are printed).
        console: Where to print (default: stdout).
    """
    from mmsafe.report.overview import pillar_verdicts, top_findings

    console = console or out_console
    _block(
        console,
        Text(f"mmsafe safety card — {card['model']['name']} on {card['data']['name']}", "bold"),
    )
    verdicts = pillar_verdicts(card)
    width = max((len(v.pillar) for v in verdicts), default=0)
    for v in verdicts:
        line = Text.assemble(
            (f"{_VERDICT_WORD[v.verdict]:<4}", _VERDICT_STYLE[v.verdict]),
            f"  {v.pillar:<{width}}  ",
            (f"({_counts(dict(v.counts))})", "dim"),
        )
        _block(console, line)
        if v.verdict in ("fail", "warn") and v.reasons:
            more = f" (+{len(v.reasons) - 1} more)" if len(v.reasons) > 1 else ""
            _block(console, Text(v.reasons[0] + more, "dim"), indent=6)

    n_findings = sum(len(c.get("findings", [])) for c in card["checks"].values())
    top = top_findings(card, TOP_FINDINGS)
    if top:
        console.print()
        of = f" ({len(top)} of {n_findings})" if n_findings > len(top) else ""
        _block(console, Text(f"Top findings{of}", "bold"))
        for f in top:
            sev = f["severity"]
            _block(
                console, Text.assemble((f"{sev:<8}", _SEVERITY_STYLE.get(sev, "")), f["check"]), 2
            )
            _block(console, Text(f["message"]), indent=10)
            if f.get("remediation"):
                _block(console, Text(f"→ {f['remediation']}", "dim"), indent=10)

    console.print()
    _block(console, Text("Checks", "bold"))
    for name, c in card["checks"].items():
        status = c["status"]
        _block(console, Text.assemble((f"{status:<9}", _STATUS_STYLE.get(status, "")), name), 2)
        detail = _first_metric(c.get("metrics", {})) if status == "ok" else c.get("reason") or ""
        findings = c.get("findings", [])
        if findings:
            serious = sum(f["severity"] in ("high", "medium") for f in findings)
            count = f"{len(findings)} finding{'s' if len(findings) != 1 else ''}"
            count += f" ({serious} serious)" if serious else ""
            detail = f"{detail} · {count}" if detail else count
        if detail:
            _block(console, Text(detail, "dim"), indent=11)

    gates = card.get("gates", []) or []
    skipped = card["data"]["skipped"]["count"]
    if gates or skipped or out is not None:
        console.print()
    for g in gates:
        _block(console, Text(f"gate {g['message']}", "red" if g["failed"] else "green"))
    if skipped:
        _block(
            console, Text(f"{skipped} invalid rows were skipped (listed in the card).", "yellow")
        )
    if out is not None:
        _block(console, Text(f"Report: {out / 'index.html'}"))
        _block(console, Text(f"JSON:   {out / 'card.json'}"))


def _progress_console(*, quiet: bool, json_out: bool) -> Console:
    """Where an audit's progress lines go: nowhere with ``--quiet``, stderr with ``--json``."""
    if quiet:
        return Console(quiet=True)
    return err_console if json_out else out_console


def _report(card: dict, out: Path | None, *, quiet: bool, json_out: bool) -> None:
    """What a finished audit prints, by ``--quiet`` and ``--json``.

    * default: the summary on stdout;
    * ``--json``: the card as JSON on stdout (exactly what ``card.json`` holds), the summary on
      stderr;
    * ``--quiet``: nothing on stdout except the JSON of ``--json``; failed gates on stderr.
    """
    if json_out:
        click.echo(json.dumps(card, indent=2, allow_nan=False))
    if not quiet:
        _summary(card, out, console=err_console if json_out else out_console)
        return
    for g in card.get("gates", []) or []:
        if g["failed"]:
            _block(err_console, Text(f"gate {g['message']}", "red"))


def _audit(
    *,
    model: str,
    data: str,
    task: str,
    checks: str,
    out: Path,
    fail_on: list[str],
    skip_invalid: bool,
    device: str,
    batch_size: int,
    seed: int,
    quick: bool,
    resume: bool,
    cache_dir: Path | None,
    classes: list[str] | None,
    options: str | None = None,
    workers: int | None = None,
    backend: str = "local",
    precision: str = "fp32",
    quiet: bool = False,
    json_out: bool = False,
) -> None:
    from mmsafe.audit import run_audit
    from mmsafe.checks import CheckSelectionError, select_checks
    from mmsafe.checks.registry import parse_check_options
    from mmsafe.data.loading import load_data
    from mmsafe.engine import DeviceError, Engine, default_cache_dir
    from mmsafe.engine.backends import BackendError, create_backend
    from mmsafe.engine.runner import PrecisionError
    from mmsafe.models.loading import load_model
    from mmsafe.report.gates import GateSyntaxError, parse_gate
    from mmsafe.tasks.base import TaskError, create_task

    user_errors = (
        *_loading_errors(),
        GateSyntaxError,
        CheckSelectionError,
        TaskError,
        DeviceError,
        BackendError,
        PrecisionError,
    )
    try:
        gates = [parse_gate(g) for g in fail_on]
        names = select_checks(checks)
        check_options = parse_check_options(options) if options else {}
        task_obj = None if task == AUTO_TASK else create_task(task)
        dataset = load_data(data, skip_invalid=skip_invalid, classes=classes)
        cache = cache_dir or default_cache_dir()
        engine = Engine(
            device=device,
            batch_size=batch_size,
            cache_dir=cache,
            seed=seed,
            workers=None if backend == "ray" else workers,
            backend=create_backend(backend, workers),
            precision=precision,
            progress=not quiet,
        )
        encoder = load_model(
            model,
            data=dataset,
            quick=quick,
            seed=seed,
            device=str(engine.device),
            cache_dir=cache,
            progress=not quiet,
        )
        task_obj = task_obj or create_task(default_task(encoder))
        result = run_audit(
            encoder,
            dataset,
            task=task_obj,
            checks=names,
            out=out,
            engine=engine,
            seed=seed,
            gates=gates,
            resume=resume,
            options=check_options,
            console=_progress_console(quiet=quiet, json_out=json_out),
        )
    except user_errors as exc:
        raise _user_error(str(exc)) from None
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted.[/yellow] Finished checks are saved; run the same command "
            "again to resume."
        )
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into exit 3
        raise _internal_error(exc, out) from None
    _report(result.card, out, quiet=quiet, json_out=json_out)
    if result.exit_code == 3:
        err_console.print(f"[red]Some checks failed internally; see {out / 'mmsafe.log'}.")
    raise typer.Exit(result.exit_code)


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="tiny-clip, lit-mini, hf:<id-or-path>, mm-sasrec, ... (list-models)"
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="A manifest (.jsonl/.csv) or a built-in world: 'shapes[:knob=v,...]', 'digits'.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Report folder.")]
ChecksOpt = Annotated[
    str, typer.Option("--checks", "-c", help="Comma-separated globs, e.g. 'monitoring.*'; 'all'.")
]
FailOnOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-on",
        help="Gate '<check>.<metric><op><value>'; exit 1 when it holds. Repeatable.",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
BatchOpt = Annotated[int, typer.Option(help="Rows per forward pass.", min=1)]
SeedOpt = Annotated[int, typer.Option(help="Seeds the world, training and every check.")]
QuickOpt = Annotated[bool, typer.Option(help="Small world and short training (for tests).")]
ResumeOpt = Annotated[
    bool, typer.Option(help="Reuse checks already finished by an interrupted run of this audit.")
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        help="Processes that decode lazy data (image files, large worlds) beside the forward "
        "passes; default: half the CPUs. With --backend ray: Ray workers (default 2).",
        min=0,
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="fp32, or bf16/fp16: mixed precision in inference passes (recorded in the card)."
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(help="Where forward passes run: local, or ray (a local Ray cluster's workers)."),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="Print nothing on stdout (no progress, no summary); errors and failed gates go to "
        "stderr and the exit code says how it went.",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the card as JSON on stdout and nothing else; progress and the summary go to "
        "stderr (none with --quiet).",
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(help="Cache folder (default: $MMSAFE_CACHE_DIR or the user cache dir)."),
]


AUTO_TASK = "auto"


def default_task(model: object) -> str:
    """The task ``--task auto`` picks by model kind.

    ``seqrec`` for a recommender, ``vqa`` for a vision-language model, ``t2i`` for a
    text-to-image generator, else ``zero_shot``.
    """
    kind = getattr(model, "kind", "encoder")
    return {"recommender": "seqrec", "vlm": "vqa", "generator": "t2i"}.get(kind, "zero_shot")


@app.command()
def audit(
    model: ModelOpt = "tiny-clip",
    data: DataOpt = "shapes",
    task: Annotated[
        str,
        typer.Option(
            help="auto (zero_shot; seqrec for a recommender, vqa for a VLM, t2i for a generator), "
            "zero_shot, retrieval, fusion, seqrec, vqa, t2i."
        ),
    ] = AUTO_TASK,
    checks: ChecksOpt = "all",
    out: OutOpt = Path("mmsafe-report"),
    fail_on: FailOnOpt = None,
    skip_invalid: Annotated[
        bool, typer.Option(help="Drop invalid manifest rows (recorded in the card).")
    ] = False,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class list (else the manifest's).")
    ] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 256,
    seed: SeedOpt = 0,
    quick: QuickOpt = False,
    resume: ResumeOpt = True,
    cache_dir: CacheOpt = None,
    workers: WorkersOpt = None,
    backend: BackendOpt = "local",
    precision: PrecisionOpt = "fp32",
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    options: Annotated[
        str | None,
        typer.Option(
            "--options",
            help='Check options as JSON, e.g. \'{"robustness.adversarial": {"steps": 20}}\', '
            "or @file.json.",
        ),
    ] = None,
) -> None:
    """Audit a model on a labelled multimodal dataset and write the safety card."""
    _audit(
        model=model,
        data=data,
        task=task,
        checks=checks,
        out=out,
        fail_on=fail_on or [],
        skip_invalid=skip_invalid,
        device=device,
        batch_size=batch_size,
        seed=seed,
        quick=quick,
        resume=resume,
        cache_dir=cache_dir,
        classes=None if classes is None else [c.strip() for c in classes.split(",")],
        options=options,
        workers=workers,
        backend=backend,
        precision=precision,
        quiet=quiet,
        json_out=json_out,
    )


@app.command()
def demo(
    out: OutOpt = Path("mmsafe-report"),
    model: ModelOpt = "tiny-clip",
    quick: QuickOpt = False,
    fail_on: FailOnOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    cache_dir: CacheOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The full audit of the embedded default: tiny-clip on the planted-flaw shapes world.

    Equals `mmsafe audit --model tiny-clip --data shapes --checks all --out DIR`; `--model
    lit-mini` audits the LiT encoder of pretrained towers instead (trained on the same world).
    """
    _audit(
        model=model,
        data=QUICK_WORLD if quick else "shapes",
        task="zero_shot",
        checks="all",
        out=out,
        fail_on=fail_on or [],
        skip_invalid=False,
        device=device,
        batch_size=256,
        seed=seed,
        quick=quick,
        resume=True,
        cache_dir=cache_dir,
        classes=None,
        quiet=quiet,
        json_out=json_out,
    )


class _HardenGroup(TyperGroup):
    """``mmsafe harden``: one subcommand per registered hardener, built when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: D102
        from mmsafe.harden.base import list_hardeners

        return list_hardeners()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: D102
        if cmd_name not in self.commands and cmd_name in self.list_commands(ctx):
            self.commands[cmd_name] = _harden_command(cmd_name)
        return self.commands.get(cmd_name)


harden_app = typer.Typer(
    cls=_HardenGroup,
    help="Fit a hardener, re-audit, and show the before/after delta.",
    no_args_is_help=True,
)
app.add_typer(harden_app, name="harden")


def _option_help(cls: type) -> dict[str, str]:
    """``{option: help}`` from the ``Args:`` section of a hardener's class docstring."""
    import inspect
    import re

    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
    helps: dict[str, str] = {}
    name = None
    for line in (section.group(1) if section else "").splitlines():
        head = re.match(r"^    (\w+): (.*)", line)
        if head:
            name, helps[head.group(1)] = head.group(1), head.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


def _harden_command(name: str) -> click.Command:
    """The click command of ``mmsafe harden <name>``: common flags + the hardener's options."""
    import inspect
    import typing

    from mmsafe.harden.base import get_hardener

    cls = get_hardener(name)
    hints = typing.get_type_hints(cls.__init__)
    helps = _option_help(cls)
    lists: dict[str, type] = {}
    tasks = " or ".join(cls.tasks or ("zero_shot", "fusion"))
    params = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=a, default=d)
        for n, a, d in (
            ("model", ModelOpt, "tiny-clip"),
            ("data", DataOpt, "shapes"),
            ("task", Annotated[str, typer.Option(help=f"{tasks}.")], cls.default_task),
            ("out", OutOpt, Path("mmsafe-hardened")),
            ("device", DeviceOpt, "auto"),
            ("seed", SeedOpt, 0),
            ("quick", QuickOpt, False),
            ("cache_dir", CacheOpt, None),
            ("quiet", QuietOpt, False),
            ("json_out", JsonOpt, False),
        )
    ]
    for opt, p in cls.options().items():
        kind, default = hints[opt], p.default
        if typing.get_origin(kind) is tuple:  # a comma-separated list on the command line
            lists[opt] = typing.get_args(kind)[0]
            kind = str
            default = ",".join(str(v) for v in default)
        required = default is inspect.Parameter.empty
        option = typer.Option(help=helps.get(opt, ""), show_default=not required)
        params.append(
            inspect.Parameter(
                opt,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[kind, option],
                default=default,
            )
        )

    def command(**kwargs: typing.Any) -> None:
        for opt, item in lists.items():
            try:
                kwargs[opt] = tuple(item(v.strip()) for v in kwargs[opt].split(",") if v.strip())
            except ValueError:
                flag = "--" + opt.replace("_", "-")
                raise _user_error(
                    f"{flag} takes comma-separated {item.__name__} values, got {kwargs[opt]!r}."
                ) from None
        common = {k: kwargs.pop(k) for k in ("model", "data", "task", "out", "device", "seed")}
        _harden(name, quick=kwargs.pop("quick"), cache_dir=kwargs.pop("cache_dir"),
                quiet=kwargs.pop("quiet"), json_out=kwargs.pop("json_out"),
                options=kwargs, **common)  # fmt: skip

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = (inspect.getdoc(cls) or cls.description).split("\n\nArgs:")[0]
    sub = typer.Typer(add_completion=False)
    sub.command(name, help=command.__doc__, short_help=cls.description)(command)
    return typer.main.get_command(sub)


def _harden(
    kind: str,
    *,
    model: str,
    data: str,
    task: str,
    out: Path,
    device: str,
    seed: int,
    quick: bool,
    cache_dir: Path | None,
    options: dict[str, object],
    quiet: bool = False,
    json_out: bool = False,
) -> None:
    from mmsafe.data.loading import load_data
    from mmsafe.engine import DeviceError, Engine, default_cache_dir
    from mmsafe.harden.base import HardenError, get_hardener
    from mmsafe.harden.flow import harden
    from mmsafe.models.loading import load_model
    from mmsafe.tasks.base import TaskError, create_task

    user_errors = (*_loading_errors(), TaskError, DeviceError, HardenError)
    try:
        hardener = get_hardener(kind)(**options)
        task_obj = create_task(task)
        dataset = load_data(data)
        cache = cache_dir or default_cache_dir()
        engine = Engine(device=device, cache_dir=cache, seed=seed, progress=not quiet)
        encoder = load_model(
            model, data=dataset, quick=quick, seed=seed, device=str(engine.device),
            cache_dir=cache, progress=not quiet,
        )  # fmt: skip
        result = harden(
            hardener, encoder, dataset, task=task_obj, out=out, engine=engine, seed=seed
        )
    except user_errors as exc:
        raise _user_error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - crashes become exit 3 with a log
        raise _internal_error(exc, out) from None
    if json_out:  # the card of the hardened model, as written to after/card.json
        click.echo(json.dumps(result.after.card, indent=2, allow_nan=False))
    if quiet:
        return
    console = err_console if json_out else out_console
    summary = ", ".join(f"{k} {v:.4g}" for k, v in result.summary.items())
    _block(console, Text.assemble((kind, "bold"), f": {summary}"))
    _block(console, Text(f"saved: {result.artifact}"))
    if result.before is not None:
        _print_deltas(
            result.before.card, result.after.card, f"{kind}: before → after", console=console
        )
    else:
        _summary(result.after.card, out / "after", console=console)


@app.command("adapt")
def adapt_cmd(
    model: ModelOpt = "tiny-clip",
    data: DataOpt = "shapes",
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="Comma-separated: full, lora, adapter, iisan, iisan-versa, momef, crossan.",
        ),
    ] = "full,lora,adapter,iisan",
    towers: Annotated[
        str | None,
        typer.Option(
            "--towers",
            help="crossan's frozen towers, comma-separated MODALITY[@MODEL] (no @MODEL: "
            "--model's), e.g. image,text,image@lit-mini,text@lit-mini (four towers of two "
            "encoders). Default: --model's image and text.",
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            "--objective",
            help="classification (fusion, accuracy), retrieval (contrastive fine-tuning, "
            "R@1/R@5; no momef, crossan) or seqrec (a SASRec over each method's item "
            "representation, on recommendation data such as shapes-rec; leave-one-out "
            "NDCG@10/HR@10).",
        ),
    ] = "classification",
    epochs: Annotated[int, typer.Option(help="Training epochs per method.", min=1)] = 3,
    batch_size: Annotated[int, typer.Option(help="Rows per training step.", min=1)] = 64,
    out: OutOpt = Path("mmsafe-adapt"),
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    quick: QuickOpt = False,
    cache_dir: CacheOpt = None,
) -> None:
    """Adapt to classification, retrieval or seqrec with each method; compare cost and quality."""
    from mmsafe.engine import DeviceError
    from mmsafe.methods.adapt import AdaptError, adapt_command, markdown_table

    try:
        reports = adapt_command(
            model, QUICK_WORLD if quick and data == "shapes" else data, method,
            objective=objective, epochs=epochs, batch_size=batch_size, seed=seed,
            device=device, out=out,
            cache_dir=cache_dir, quick=quick, towers=towers,
        )  # fmt: skip
    except (*_loading_errors(), AdaptError, DeviceError) as exc:
        raise _user_error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - crashes become exit 3 with a log
        raise _internal_error(exc, out) from None
    out_console.print(markdown_table(reports), highlight=False)
    out_console.print(f"saved: {out / 'adaptation.json'}")


@app.command("judge")
def judge_cmd(
    file: Annotated[
        Path,
        typer.Argument(help="CSV of question, answer and optionally label (1 = complies)."),
    ],
    hf_judge: Annotated[
        Path | None,
        typer.Option(
            "--hf-judge",
            help="Folder of a local Hugging Face sequence classifier to add to the ensemble "
            "(never downloaded).",
        ),
    ] = None,
) -> None:
    """Judge each answer (complies or refuses) with an offline ensemble; write FILE.judged.csv.

    With a label column, prints each judge's precision, recall and F1; always prints each
    judge's attack success rate and the agreement (Cohen's kappa) of every pair of judges.
    """
    from mmsafe.engine.cache import atomic_write_text
    from mmsafe.methods.judge import (
        JudgeError,
        default_judges,
        judge_table,
        judged_csv_text,
        judged_path,
        read_judge_csv,
    )

    out = judged_path(file)
    try:
        table = read_judge_csv(file)
        report = judge_table(table, default_judges(hf_judge))
        text = judged_csv_text(table, report)
    except JudgeError as exc:
        raise _user_error(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - crashes become exit 3 with a log
        raise _internal_error(exc, out.parent) from None
    try:
        atomic_write_text(out, text)
    except OSError as exc:
        raise _user_error(f"cannot write {out}: {exc.strerror or exc}") from None

    table_out = Table(title=f"judges on {len(table.rows)} answers ({report.unscorable} unscorable)")
    scored = table.truth is not None
    columns = ["judge", "ASR", *(("precision", "recall", "F1", "accuracy") if scored else ())]
    for col in columns:
        table_out.add_column(col, justify="left" if col == "judge" else "right")
    for name, rate in report.success_rates.items():
        cells = [f"{rate:.3f}"]
        if scored:
            cells += [f"{report.metrics[f'{name}/{m}']:.3f}" for m in ("precision", "recall")]
            cells += [f"{report.metrics[f'{name}/{m}']:.3f}" for m in ("f1", "accuracy")]
        table_out.add_row(name, *cells)
    out_console.print(table_out)
    lo, hi = report.band
    out_console.print(f"ASR band across judges: {lo:.3f} to {hi:.3f}", highlight=False)
    if report.agreement:
        kappas = Table(title="agreement (Cohen's kappa)")
        kappas.add_column("judges")
        kappas.add_column("kappa", justify="right")
        for key, kappa in report.agreement.items():
            kappas.add_row(key.removeprefix("kappa/"), f"{kappa:.3f}")
        out_console.print(kappas)
    out_console.print(f"wrote: {out}", highlight=False)


@app.command("list-checks")
def list_checks_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob over check names.")] = "*",
) -> None:
    """List the registered checks: pillar, target kinds, tasks, what they need, old names."""
    from mmsafe.checks import get_check, list_checks

    for name in list_checks(pattern):  # one block per check: readable at any width
        cls = get_check(name)
        also = f" [dim](also: {', '.join(cls.aliases)})[/dim]" if cls.aliases else ""
        needs = f" · needs {', '.join(cls.requires)}" if cls.requires else ""
        out_console.print(f"[bold]{name}[/bold]{also}", highlight=False)
        out_console.print(
            f"    {', '.join(cls.kinds)} · {', '.join(cls.tasks)}{needs}", highlight=False
        )
        out_console.print(f"    {cls.description}", highlight=False, style="dim")


@app.command("list-models")
def list_models_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob over model names.")] = "*",
) -> None:
    """List the registered models (a name ending in ':' takes an id or path after it)."""
    import mmsafe.models  # noqa: F401 - registers the built-in models
    from mmsafe.models.base import list_models, model_descriptions

    table = Table(title="models")
    for col in ("name", "kind", "description"):
        table.add_column(col)
    for name in list_models(pattern):
        kind, desc = model_descriptions()[name]
        table.add_row(name + ("<id-or-path>" if name.endswith(":") else ""), kind, desc)
    out_console.print(table)


def _print_deltas(before: dict, after: dict, title: str, console: Console | None = None) -> None:
    """Every metric both cards report: its full key, then ``before -> after (delta) verdict``.

    Two lines per metric, wrapped to the console's width: a key is never truncated (it is the
    ``--fail-on`` path), and the numbers never wrap into a column.
    """
    from mmsafe.report.compare import compare_cards

    console = console or out_console
    deltas = compare_cards(before, after)
    _block(console, Text(title, "bold"))
    if not deltas:
        _block(console, Text("No metric is reported by both cards.", "dim"), indent=2)
    for d in deltas:
        verdict = {True: ("better", "green"), False: ("worse", "red"), None: ("", "")}
        word, style = verdict[d.improved]
        _block(console, Text(d.metric), indent=2)
        line = Text(f"{d.before:.4g} → {d.after:.4g} ({d.delta:+.4g}) ", "dim")
        _block(console, line + Text(word, style), indent=6)


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(help="card.json of the baseline (or its folder).")],
    after: Annotated[Path, typer.Argument(help="card.json to compare (or its folder).")],
) -> None:
    """Before/after deltas of every metric two cards share (e.g. after hardening)."""
    from mmsafe.report.card import load_card
    from mmsafe.report.compare import CardFormatError

    cards = []
    for p in (before, after):
        path = p / "card.json" if p.is_dir() else p
        try:
            cards.append(load_card(path))
        except (OSError, ValueError, RecursionError) as exc:
            raise _user_error(f"cannot read the card {path}: {exc}") from None
    try:
        _print_deltas(cards[0], cards[1], f"{before} → {after}")
    except CardFormatError as exc:
        raise _user_error(f"cannot compare {before} and {after}: {exc}") from None


def _version(value: bool) -> None:
    if value:
        out_console.print(f"mmsafe {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Audit and harden multimodal foundation models."""


def main() -> None:
    """Console-script entry point."""
    app()
