"""The Ray backend: the shards, embeddings and card of the local engine, from Ray actors.

The Ray tests share one local Ray cluster of 2 CPUs (a module fixture) and shrink
``SHARD_ROWS`` so that small datasets span several shards; the backend hands the shard size it
sees to its actors. Each fill starts an actor pool (seconds on a small machine), so the tests
make few fills. Nothing here asserts on wall-clock time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsafe.engine import Engine, runner
from mmsafe.engine.ray_backend import (
    RayBackend,
    RayWorkerError,
    _Payload,
    _portable,
    _ShardWorker,
)
from mmsafe.engine.runner import RowsJob
from mmsafe.engine.variants import corruption_variant
from tests.conftest import ToyEncoder, make_colour_data, require

ROOT = Path(__file__).resolve().parents[1]
NOISY = corruption_variant("image", "gaussian_noise", 3, seed=5)


def encoded(engine: Engine) -> int:
    return engine.accounting()["rows_encoded"]


def shard_files(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "embeddings").glob("*.safetensors"))}


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    """A local Ray cluster of 2 CPUs for this module; its workers can import ``tests``."""
    ray = require("ray")
    require("ray.data")
    require("pyarrow")
    if ray.is_initialized():  # another module's cluster: start ours, with our PYTHONPATH
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:  # the workers inherit the cluster's environment
        path = os.environ.get("PYTHONPATH")
        mp.setenv("PYTHONPATH", str(ROOT) if not path else f"{ROOT}{os.pathsep}{path}")
        with warnings.catch_warnings():  # Ray 2.55's FutureWarning about GPU env vars
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
    yield ray
    ray.shutdown()


@pytest.fixture
def threads() -> Any:
    """Restore torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


class DiesOnce(ToyEncoder):
    """SIGKILLs its own process in the middle of its first shard, once, and never the driver."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker, self.driver, self.calls = str(marker), os.getpid(), 0

    def encode_modality(self, modality: str, batch: Any) -> torch.Tensor:
        self.calls += 1  # per process: each actor unpickles its own copy
        if self.calls == 2 and os.getpid() != self.driver and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))  # the retry finds it and goes on
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_modality(modality, batch)


class Slow(ToyEncoder):
    """The toy encoder, a quarter of a second per batch (the same fingerprint and embeddings)."""

    def encode_modality(self, modality: str, batch: Any) -> torch.Tensor:
        time.sleep(0.25)
        return super().encode_modality(modality, batch)


class Broken(ToyEncoder):
    def encode_modality(self, modality: str, batch: Any) -> torch.Tensor:
        raise ValueError("a broken tower")


# ---------------------------------------------------------------------------- without Ray


def test_the_worker_writes_the_shards_the_local_engine_writes(tmp_path, monkeypatch, threads):
    """The actor's code, run in this process: the same shard files, byte for byte."""
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    data, model = make_colour_data(50), ToyEncoder()
    local = Engine(batch_size=8, cache_dir=tmp_path / "local", progress=False, workers=0)
    want = local.embed(model, data, "image", variant=NOISY)
    job = RowsJob(model, data, "image", NOISY, data.fingerprint())
    payload = _Payload(job, "cpu", 8, str(tmp_path / "worker"), 0, 16, threads)
    worker = _ShardWorker([payload])
    todo = [(s, np.arange(s * 16, min(50, s * 16 + 16))) for s in range(4)]
    batch = {
        "shard": np.array([s for s, _ in todo]),
        "rows": np.array([m.astype("<i8").tobytes() for _, m in todo], dtype=object),
    }
    out = worker(batch)
    assert out["shard"].tolist() == [0, 1, 2, 3] and out["rows"].tolist() == [16, 16, 16, 2]
    assert list(out["error"]) == ["", "", "", ""]
    assert shard_files(tmp_path / "worker") == shard_files(tmp_path / "local")
    driver = Engine(batch_size=8, cache_dir=tmp_path / "worker", progress=False)
    torch.testing.assert_close(driver.embed(model, data, "image", variant=NOISY), want)
    assert encoded(driver) == 0  # every shard was there

    bad = _ShardWorker([_Payload(job._replace(model=Broken()), "cpu", 8, str(tmp_path), 0, 16, 1)])
    errors = bad({"shard": np.array([0]), "rows": np.array([b"\0" * 8], dtype=object)})["error"]
    assert errors[0].rstrip().endswith("ValueError: a broken tower")


def test_a_model_inside_a_counting_block_travels_without_the_engine(toy_model):
    engine = Engine(progress=False)
    with engine.counting(toy_model, "gradient_passes"):
        with pytest.raises((AttributeError, pickle.PicklingError)):
            pickle.dumps(toy_model)  # its encode is a closure over the engine
        clone = _portable(toy_model)
        assert "encode" in toy_model.__dict__ and "encode" not in clone.__dict__
        again = pickle.loads(pickle.dumps(clone))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(again.encode({"image": x}), toy_model.encode({"image": x}))
    assert _portable(toy_model) is toy_model  # outside the block: nothing to drop


def test_a_one_shard_fill_stays_in_the_driver_and_settings_are_checked(toy_model, tmp_path):
    backend = RayBackend(workers=2)  # min_shards=2: a one-shard fill is not worth a pool
    engine = Engine(batch_size=8, cache_dir=tmp_path, progress=False, backend=backend)
    got = engine.embed(toy_model, make_colour_data(30), "image")
    assert got.shape == (30, 3) and encoded(engine) == 30
    assert backend.totals == {"fills": 0, "shards": 0, "rows": 0, "kept_local": 1}
    assert not backend.started_ray
    for bad in ({"workers": 0}, {"cpus_per_worker": 0}, {"retries": -1}, {"min_shards": 0}):
        with pytest.raises(ValueError):
            RayBackend(**bad)
    assert RayBackend(workers=3).resources([2.0]) == (0.6, 1)  # more workers than CPUs
    assert RayBackend(workers=4, threads_per_worker=2).resources([8.0, 8.0]) == (3.9, 2)


def test_without_ray_data_the_cli_exits_2_with_install_advice(tmp_path, monkeypatch):
    from mmsafe.cli import app

    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name.split(".")[0] == "ray" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    args = ["audit", "--model", "tiny-clip", "--data", "shapes:n=300", "--backend", "ray"]
    args += ["--workers", "2", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "pip install 'mmsafe[ray]'" in text and "Traceback" not in text
    assert not (tmp_path / "out" / "card.json").exists()


# ---------------------------------------------------------------------------- on Ray


@pytest.mark.slow
def test_ray_embeddings_equal_the_local_engine(ray_cluster, tmp_path, monkeypatch):
    """Clean (both towers) and corrupted, a subset then the whole: the same bytes."""
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    data, model = make_colour_data(70), ToyEncoder()  # 5 shards, the last one of 6 rows
    part = data.subset(np.arange(0, 70, 3), name="every third")  # leaves partial shards
    local = Engine(batch_size=8, cache_dir=tmp_path / "local", progress=False, workers=0)
    backend = RayBackend(workers=2, threads_per_worker=torch.get_num_threads(), min_shards=1)
    remote = Engine(batch_size=8, cache_dir=tmp_path / "ray", progress=False, backend=backend)
    for which, variant, modalities in (
        (part, None, "image"),
        (data, None, None),
        (data, NOISY, "image"),
    ):
        want = local.embed(model, which, modalities, variant=variant)
        got = remote.embed(model, which, modalities, variant=variant)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert remote.accounting() == local.accounting()
    assert encoded(remote) == 70 * 2 + 70  # image and text, clean; image, corrupted
    # every row went through Ray: the subset's images, the other images, the texts, the variant
    assert backend.totals == {"fills": 4, "shards": 20, "rows": 210, "kept_local": 0}
    files = shard_files(tmp_path / "ray")
    assert len(files) == 15 and files == shard_files(tmp_path / "local")


@pytest.mark.slow
def test_a_ray_audit_writes_the_local_card(ray_cluster, tmp_path, monkeypatch, threads):
    """The same card (outside the run sections) and the same pass accounting as a local run."""
    from mmsafe.audit import run_audit
    from mmsafe.data.loading import load_data
    from mmsafe.models.tiny_clip import TinyClip
    from mmsafe.report.card import RUN_SECTIONS, without_run_sections

    monkeypatch.setattr(runner, "SHARD_ROWS", 64)  # 300 rows: 5 shards
    torch.set_num_threads(1)  # the driver's count, and each worker's
    torch.manual_seed(0)
    model, world = TinyClip(), load_data("shapes:n=300")  # a real (untrained) network
    checks = "performance.classification,monitoring.conformal"
    options = {"monitoring.conformal": {"shifts": ["gaussian_noise"]}}  # one variant: 3 fills
    cards = {}
    backend = RayBackend(workers=2, threads_per_worker=1, min_shards=1)
    for name, backend_or_none in (("local", None), ("ray", backend)):
        engine = Engine(
            batch_size=32,
            cache_dir=tmp_path / f"{name}-cache",
            progress=False,
            workers=0,
            backend=backend_or_none,
        )
        out = tmp_path / name
        result = run_audit(model, world, checks=checks, out=out, engine=engine, options=options)
        assert result.exit_code == 0
        cards[name] = json.loads((tmp_path / name / "card.json").read_text("utf-8"))
    assert set(RUN_SECTIONS) <= set(cards["ray"])
    local, ray = (json.dumps(without_run_sections(c), indent=2) for c in cards.values())
    assert ray == local
    assert cards["ray"]["engine"] == cards["local"]["engine"]
    assert all(c["status"] == "ok" for c in cards["ray"]["checks"].values())
    assert backend.totals["fills"] == 3 and backend.totals["kept_local"] == 0


@pytest.mark.slow
def test_a_worker_killed_mid_shard_is_restarted_and_its_shard_recomputed(
    ray_cluster, tmp_path, monkeypatch
):
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    data, marker = make_colour_data(50), tmp_path / "killed.pid"
    want = Engine(batch_size=8, progress=False).embed(ToyEncoder(), data, "image")
    backend = RayBackend(workers=2, min_shards=1)
    engine = Engine(batch_size=8, cache_dir=tmp_path / "cache", progress=False, backend=backend)
    got = engine.embed(DiesOnce(marker), data, "image")  # 2 batches a shard: dies after one
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert encoded(engine) == 50  # rows counted once, retried or not
    assert backend.totals["rows"] == 50 and len(shard_files(tmp_path / "cache")) == 4


@pytest.mark.slow
def test_a_resume_with_more_workers_computes_only_the_lost_shards(
    ray_cluster, toy_model, tmp_path, monkeypatch
):
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    data, cache = make_colour_data(70), tmp_path / "cache"
    first = Engine(
        batch_size=8, cache_dir=cache, progress=False, backend=RayBackend(2, min_shards=1)
    )
    whole = first.embed(toy_model, data, "image")
    files = sorted((cache / "embeddings").glob("*.safetensors"), key=lambda f: f.name[-17:])
    assert [f.name[-17:] for f in files] == [f"-{s:04d}.safetensors" for s in range(5)]
    for f in files[::2]:  # shards 0, 2 and 4: 16 + 16 + 6 rows
        f.unlink()
    backend = RayBackend(workers=3, min_shards=1)  # 3 actors of 0.6 CPUs on the 2 CPUs
    resumed = Engine(batch_size=8, cache_dir=cache, progress=False, backend=backend)
    got = resumed.embed(toy_model, data, "image")
    assert encoded(resumed) == 38 and backend.totals["shards"] == 3
    assert backend.last_fill["workers"] == 3 and backend.last_fill["cpus_per_worker"] == 0.6
    torch.testing.assert_close(got, whole, rtol=0, atol=0)


@pytest.mark.slow
def test_a_failing_worker_raises_a_clear_error_in_the_driver(ray_cluster, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    engine = Engine(
        batch_size=8,
        cache_dir=tmp_path,
        progress=False,
        backend=RayBackend(workers=2, min_shards=1),
    )
    with pytest.raises(RayWorkerError, match=r"shard \d of embed image \[colours\]") as err:
        engine.embed(Broken(), make_colour_data(50), "image")
    first_line = str(err.value).splitlines()[0]
    assert "ValueError: a broken tower (4 of 4 shards failed)" in first_line


DRIVER = """
import sys
from mmsafe.engine import Engine, runner
from mmsafe.engine.ray_backend import RayBackend
from tests.conftest import make_colour_data
from tests.test_ray_backend import Slow

runner.SHARD_ROWS = 16
backend = RayBackend(workers=2, min_shards=1)  # starts a local Ray cluster of its own
engine = Engine(batch_size=8, cache_dir=sys.argv[1], progress=True, backend=backend)
engine.embed(Slow(), make_colour_data(400), "image")
"""


@pytest.mark.slow
def test_a_killed_ray_driver_resumes_from_the_shards_its_workers_wrote(
    ray_cluster, toy_model, tmp_path, monkeypatch
):
    """SIGKILL a driver (and its Ray cluster) mid-fill; a 3-worker resume computes the rest."""
    cache, log = tmp_path / "cache", tmp_path / "driver.log"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(cache)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its Ray cluster shares its process group
        )
    try:
        deadline = time.monotonic() + 600  # a guard against a hung driver, not a timing
        while len(list(cache.glob("embeddings/*.safetensors"))) < 3:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no shard was written"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:  # the driver's Ray processes (actors, raylet) go with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1)  # the group's last writes land (atomically) or never happen
    kept = len(list(cache.glob("embeddings/*.safetensors")))
    assert 3 <= kept < 25, f"{kept} of 25 shards were written before the kill"
    monkeypatch.setattr(runner, "SHARD_ROWS", 16)
    backend = RayBackend(workers=3, min_shards=1)
    resumed = Engine(batch_size=8, cache_dir=cache, progress=False, backend=backend)
    got = resumed.embed(toy_model, make_colour_data(400), "image")
    assert encoded(resumed) == 400 - 16 * kept == backend.totals["rows"]
    want = Engine(batch_size=8, progress=False).embed(toy_model, make_colour_data(400), "image")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
