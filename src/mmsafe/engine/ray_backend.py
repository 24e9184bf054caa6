"""The Ray backend: missing shards of dataset-row embeddings computed by a pool of Ray actors.

``mmsafe audit --backend ray --workers N`` gives the engine a :class:`RayBackend`. When the
engine finds shards of an embedding entry missing from its on-disk cache
(:meth:`~mmsafe.engine.runner.Engine.embed`), it hands them to :meth:`RayBackend.fill`, which runs
them through Ray Data's ``map_batches`` on a pool of ``N`` actors. Each actor holds one copy of
the model and the dataset (put in the object store once per fill) and an engine of its own that
shares the driver's cache folder; for every shard it is given, it encodes the missing rows with
exactly the batches the driver's own engine would use and writes the shard file atomically under
the same key. The driver then reads the shards back, counts their rows as encoded, and computes
in its own process whatever is still missing.

What makes this safe:

* **Retries are idempotent.** A shard's file name is a hash of its content's identity (model,
  data, modality, variant, shard index), and it is written to a temporary file and renamed into
  place: a task retried after its actor was killed mid-shard rewrites the same file, and a reader
  never sees half of one. Actors are restarted (``max_restarts``) and their tasks retried
  (``max_task_retries``) ``retries`` times.
* **Resumes need not match.** Shards are keyed by content, not by worker: a run with 3 workers
  resumes the shards a run with 2 workers (or the local engine) finished, and computes only the
  rest.
* **Same bytes as the local engine** when each worker runs with the torch thread count the local
  run used (floating-point sums may depend on how a matrix product is split across threads).

A fill of fewer than ``min_shards`` shards (2 by default) stays in the driver: a shard is one
worker's unit of work, so a one-shard fill gains nothing from a pool whose start-up costs seconds.

Ray is an optional extra (``pip install 'mmsafe[ray]'``); this module imports it only inside
:meth:`RayBackend.fill`, so importing it never starts (or needs) Ray.

Example:
    >>> backend = RayBackend(workers=2, cpus_per_worker=0.9)
    >>> backend.name, backend.workers
    ('ray', 2)
    >>> backend.resources([2.0])  # (CPUs Ray reserves per actor, torch threads per actor)
    (0.9, 1)
    >>> RayBackend(workers=2).resources([16.0])
    (7.9, 8)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsafe.engine import runner

if TYPE_CHECKING:
    from mmsafe.engine.runner import Engine, RowsJob

__all__ = ["RayBackend", "RayWorkerError"]

DRIVER_SHARE = 0.1
"""CPUs per worker that Ray does not hand to the actors: room for the driver and Ray Data (a
cluster whose CPUs are all held by actors can leave Ray Data's own work waiting forever)."""
WAIT_FOR_ACTORS_S = 600
"""How long a fill waits for its actors to start before it fails (never forever)."""


class RayWorkerError(RuntimeError):
    """A Ray worker could not compute a shard; the message holds its exception and traceback."""


@dataclass(frozen=True)
class _Payload:
    """What every actor of one fill needs: the job and the driver engine's settings."""

    job: RowsJob
    device: str
    batch_size: int
    cache_dir: str
    seed: int
    shard_rows: int
    threads: int
    precision: str = "fp32"


class _ShardWorker:
    """One actor of the pool: one model, one engine; computes the shards it is given.

    Everything is set up on the first batch, inside a ``try``, so a failure (an import error
    while unpickling the model, say) comes back to the driver as a result, not as a dead actor.
    A restarted actor sets up again from the same payload.

    Args:
        payload: ``[ref]``, the object ref of a :class:`_Payload` (wrapped in a list, so Ray
            hands the actor the ref rather than the value: the value is fetched on first use),
            or ``[payload]`` itself (in-process, for tests).
    """

    def __init__(self, payload: list[Any]) -> None:
        self._ref = payload[0]
        self._job: RowsJob | None = None
        self._engine: Engine | None = None

    def _setup(self) -> None:
        import torch

        from mmsafe.engine.runner import Engine

        p = self._ref
        if not isinstance(p, _Payload):
            import ray

            p = ray.get(p)
        torch.set_num_threads(p.threads)
        runner.SHARD_ROWS = p.shard_rows  # the driver's (tests shrink it): the same shard keys
        engine = Engine(
            device=p.device,
            batch_size=p.batch_size,
            cache_dir=p.cache_dir,
            seed=p.seed,
            progress=False,
            workers=0,  # the actor's CPU share runs the forward passes; no loader processes
            precision=p.precision,  # the same cache keys and numerics as the driver's
        )
        engine.cache.memory_bytes = 0  # shards go to disk; keep only the latest in memory
        self._job, self._engine = p.job, engine

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute the shards of ``batch`` (``shard``: indices, ``rows``: int64 bytes each)."""
        done, errors, seconds = [], [], []
        for raw in batch["rows"]:
            rows = np.frombuffer(raw, dtype="<i8")
            start = time.perf_counter()
            try:
                if self._engine is None:
                    self._setup()
                job, engine = self._job, self._engine
                assert job is not None and engine is not None
                engine.embed(
                    job.model,
                    job.data,
                    job.modality,
                    variant=job.variant,
                    rows=rows,
                    data_fingerprint=job.data_fp,
                )
                errors.append("")
            except Exception:
                errors.append(traceback.format_exc())
            done.append(len(rows))
            seconds.append(time.perf_counter() - start)
        return {
            "shard": np.asarray(batch["shard"], dtype=np.int64),
            "rows": np.asarray(done, dtype=np.int64),
            "error": np.asarray(errors, dtype=object),
            "seconds": np.asarray(seconds, dtype=np.float64),
            "pid": np.full(len(done), os.getpid(), dtype=np.int64),
        }


def _portable(model: Any) -> Any:
    """``model`` without an engine's ``counting`` wrapper (which would drag the engine along).

    Inside :meth:`Engine.counting <mmsafe.engine.runner.Engine.counting>`, ``model.encode`` is an
    instance attribute that closes over the engine; a shallow copy without it pickles the same
    weights and the class's own ``encode``. Passes run by an engine are never counted by that
    wrapper anyway.
    """
    if "encode" not in getattr(model, "__dict__", {}):
        return model
    clone = copy.copy(model)
    object.__delattr__(clone, "encode")
    return clone


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Keep Ray Data's console log (INFO lines, warnings, duplicated tracebacks) off the terminal.

    Failures come back as :class:`RayWorkerError`; Ray Data's full log stays in the Ray
    session's ``logs/ray-data*.log`` files.
    """
    handlers = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)


def _local_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform has one)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class RayBackend:
    """Compute an engine's missing shards on a pool of Ray actors (Ray Data ``map_batches``).

    Ray is initialised on the first fill that needs it: a local cluster of this machine's CPUs,
    or the cluster at ``$RAY_ADDRESS``; a Ray already initialised by the caller is used as it
    is. On a cluster of several machines, the engine's cache folder must be on a filesystem
    they share: shards the driver cannot read are computed again in the driver.

    Args:
        workers: actors in the pool (each holds one copy of the model).
        cpus_per_worker: CPUs Ray reserves for each actor; ``None``: an even share of the
            smallest node's CPUs less :data:`DRIVER_SHARE` (``0.9`` for 2 workers on 2 CPUs).
        threads_per_worker: torch threads in each actor; ``None``: the actor's CPU share, at
            least 1 (``max(1, int(share))``). For the local engine's bytes, use the local run's
            thread count.
        gpus_per_worker: GPUs per actor when the engine's device is CUDA; ``None``: the
            cluster's GPUs shared evenly (at most 1 each).
        retries: actor restarts and task retries after a worker dies (killed, out of memory).
        min_shards: fills of fewer shards stay in the driver. A shard is one worker's unit of
            work, so a one-shard fill cannot run in parallel, and starting an actor pool costs
            seconds (importing torch and the model in each actor); the driver's engine then
            computes it as it would without a backend.

    Raises:
        ValueError: ``workers < 1`` or another non-positive setting.
    """

    name = "ray"

    def __init__(
        self,
        workers: int = 2,
        cpus_per_worker: float | None = None,
        threads_per_worker: int | None = None,
        gpus_per_worker: float | None = None,
        retries: int = 3,
        min_shards: int = 2,
    ) -> None:
        if workers < 1:
            raise ValueError(f"the ray backend needs at least one worker, got {workers}")
        for label, value in (
            ("cpus_per_worker", cpus_per_worker),
            ("threads_per_worker", threads_per_worker),
            ("gpus_per_worker", gpus_per_worker),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{label} must be > 0, got {value}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if min_shards < 1:
            raise ValueError(f"min_shards must be >= 1, got {min_shards}")
        self.workers = int(workers)
        self.cpus_per_worker = cpus_per_worker
        self.threads_per_worker = threads_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.retries = int(retries)
        self.min_shards = int(min_shards)
        self.started_ray = False
        self.last_fill: dict[str, Any] = {}
        self.totals = {"fills": 0, "shards": 0, "rows": 0, "kept_local": 0}
        """What this backend sent to Ray (fills, shards, rows) and the fills it left local."""

    def __repr__(self) -> str:
        return f"RayBackend(workers={self.workers})"

    # ------------------------------------------------------------------ resources
    def resources(self, node_cpus: Sequence[float]) -> tuple[float, int]:
        """``(CPUs Ray reserves per actor, torch threads per actor)`` on nodes of ``node_cpus``.

        The actors are spread over the nodes; each gets an even share of the smallest node.
        """
        nodes = [float(c) for c in node_cpus if c > 0] or [float(_local_cpus())]
        per_node = -(-self.workers // len(nodes))
        share = min(nodes) / per_node
        if self.cpus_per_worker is not None:
            cpus = float(self.cpus_per_worker)
            threads = max(1, round(cpus))
        else:
            cpus = round(share - DRIVER_SHARE if share >= 1 else share * (1 - DRIVER_SHARE), 3)
            threads = max(1, int(share))
        if self.threads_per_worker is not None:
            threads = int(self.threads_per_worker)
        return cpus, threads

    def _ensure_ray(self) -> None:
        """Initialise Ray, unless it is: the cluster at ``$RAY_ADDRESS``, else a local one.

        A local cluster gets this machine's CPUs (its affinity) and no dashboard.
        """
        import ray

        if ray.is_initialized():
            return
        quiet = {"ignore_reinit_error": True, "log_to_driver": False, "configure_logging": False}
        with warnings.catch_warnings():  # a FutureWarning about GPU env vars in Ray 2.55
            warnings.simplefilter("ignore", FutureWarning)
            if os.environ.get("RAY_ADDRESS"):  # connect: the cluster's resources are its own
                ray.init(**quiet)
            else:
                ray.init(num_cpus=_local_cpus(), include_dashboard=False, **quiet)
        self.started_ray = True

    def close(self) -> None:
        """Shut Ray down if this backend started it (Ray also does at interpreter exit)."""
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False

    # ------------------------------------------------------------------ the fill
    def fill(self, engine: Engine, job: RowsJob, todo: list[tuple[int, np.ndarray]]) -> None:
        """Compute rows ``missing`` of each ``(shard, missing)`` of ``todo`` into the cache.

        One Ray Data row per shard (one block each, so shards spread over the actors as they
        free up); one actor pool of :attr:`workers` actors for the fill. Prints one line to
        the engine's stream when the engine reports progress.

        Raises:
            RayWorkerError: a worker failed on a shard (its exception and traceback), or Ray
                could not run the pool (e.g. an actor died more than ``retries`` times).
        """
        if not todo:
            return
        if len(todo) < self.min_shards:
            self.totals["kept_local"] += 1
            return
        if engine.cache_dir is None:
            raise ValueError("the ray backend writes shards to the on-disk cache: set cache_dir")
        import ray
        import ray.data

        start = time.perf_counter()
        self._ensure_ray()

        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        cpus, threads = self.resources(nodes)
        remote: dict[str, Any] = {"num_cpus": cpus}
        device = engine.device.type  # an actor sees its own GPU(s) as cuda:0
        if device == "cuda":
            gpus = float(ray.cluster_resources().get("GPU", 0))
            remote["num_gpus"] = self.gpus_per_worker or min(1.0, gpus / self.workers)
        payload = _Payload(
            job=job._replace(model=_portable(job.model)),
            device=device,
            batch_size=engine.batch_size,
            cache_dir=str(Path(engine.cache_dir).resolve()),  # actors may run elsewhere
            seed=engine.seed,
            shard_rows=runner.SHARD_ROWS,
            threads=threads,
            precision=engine.precision,
        )
        ref = ray.put(payload)
        items = [{"shard": int(s), "rows": np.asarray(m, "<i8").tobytes()} for s, m in todo]
        with _quiet_ray_data():
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ctx = ds.context  # this dataset's own copy of the DataContext
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            ctx.verbose_stats_logs = False
            ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
            out = ds.map_batches(
                _ShardWorker,
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(
                    size=min(self.workers, len(items)),
                    max_tasks_in_flight_per_actor=1,  # a shard to whichever actor is free
                ),
                fn_constructor_kwargs={"payload": [ref]},
                max_restarts=self.retries,
                max_task_retries=self.retries,
                **remote,
            )
            try:
                results = out.take_all()
            except ray.exceptions.RayError as err:
                last = str(err).strip().splitlines()[-1:] or [""]
                raise RayWorkerError(
                    f"the Ray workers could not compute {len(todo)} shard(s) of "
                    f"{_label(job)}: {type(err).__name__}: {last[0]}"
                ) from err
        del ref
        failed = [r for r in results if r["error"]]
        if failed:
            first = failed[0]
            tb = str(first["error"]).rstrip()
            raise RayWorkerError(
                f"a Ray worker failed on shard {first['shard']} of {_label(job)}: "
                f"{tb.splitlines()[-1]} ({len(failed)} of {len(todo)} shards failed). "
                f"The worker's traceback:\n{tb}"
            )
        seconds = time.perf_counter() - start
        rows = int(sum(m.size for _, m in todo))
        self.totals["fills"] += 1
        self.totals["shards"] += len(todo)
        self.totals["rows"] += rows
        per_worker: dict[int, list[float]] = {}
        for r in results:
            got = per_worker.setdefault(int(r["pid"]), [0, 0.0])
            got[0] += int(r["rows"])
            got[1] += float(r["seconds"])
        self.last_fill = {
            "shards": len(todo),
            "rows": rows,
            "seconds": seconds,
            "workers": self.workers,
            "cpus_per_worker": cpus,
            "threads_per_worker": threads,
            # rows and busy seconds per actor process (a restarted actor is a new process)
            "per_worker": [(int(n), round(t, 3)) for n, t in per_worker.values()],
        }
        if engine.progress:
            stream = engine.stream or sys.stderr
            stream.write(
                f"{_label(job)}: {rows} rows in {len(todo)} shards on {self.workers} Ray workers\n"
            )
            stream.flush()


def _label(job: RowsJob) -> str:
    """The engine's label of a sweep: ``embed image (corrupt/...) [shapes]``."""
    variant = f" ({job.variant.label})" if job.variant is not None else ""
    return f"embed {job.modality}{variant} [{job.data.name}]"
