"""Scale: a killed sweep resumes from its finished shards; lazy worlds audit like eager ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mmsafe
from mmsafe.audit import run_audit
from mmsafe.data.worlds.shapes import make_shapes
from mmsafe.engine import Engine
from mmsafe.report.card import without_run_sections
from tests.conftest import make_colour_data

ROWS, SHARD = 600, 64

SWEEP = textwrap.dedent(
    f"""
    import sys, time
    import mmsafe.engine.runner as runner
    from mmsafe.engine import Engine
    from tests.conftest import ToyEncoder, make_colour_data

    runner.SHARD_ROWS = {SHARD}
    model = ToyEncoder()
    inner = model.encode

    def slow(batch, *a, **k):  # slow enough for the parent to kill it mid-sweep
        time.sleep(0.15)
        return inner(batch, *a, **k)

    model.encode = slow
    Engine(batch_size=16, cache_dir=sys.argv[1], progress=False).embed(
        model, make_colour_data({ROWS}), "image"
    )
    """
)


def test_a_killed_sweep_resumes_from_the_shards_it_finished(tmp_path, toy_model, monkeypatch):
    repo = Path(mmsafe.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'src'}"}
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SWEEP, str(cache)], env=env, cwd=repo)
    shards = cache / "embeddings"
    deadline = time.monotonic() + 600  # a guard against a hung child, not a timing assertion
    while len(list(shards.glob("*.safetensors"))) < 3 and time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("*.safetensors")))
    assert 3 <= done < -(-ROWS // SHARD)  # killed mid-sweep, with finished shards on disk

    monkeypatch.setattr("mmsafe.engine.runner.SHARD_ROWS", SHARD)
    data = make_colour_data(ROWS)
    resumed = Engine(batch_size=32, cache_dir=cache, progress=False)
    got = resumed.embed(toy_model, data, "image")
    assert resumed.accounting()["rows_encoded"] == ROWS - done * SHARD  # only the lost shards
    whole = Engine(batch_size=16, progress=False).embed(toy_model, data, "image")
    torch.testing.assert_close(got, whole, rtol=0, atol=0)


@pytest.mark.slow
def test_a_lazy_world_audits_to_the_eager_worlds_card(shapes_quick):
    _, model = shapes_quick
    checks = "performance.classification,monitoring.calibration,monitoring.ood"
    cards = []
    for lazy in (False, True):
        world = make_shapes(n=400, seed=3, lazy=lazy)
        engine = Engine(batch_size=64, progress=False, workers=1 if lazy else 0)
        cards.append(run_audit(model, world, checks=checks, engine=engine).card)
    eager, lazy_card = (without_run_sections(c) for c in cards)
    # the data fingerprint keys the cache: a lazy column is identified by its spec, not pixels
    assert eager["data"].pop("fingerprint") != lazy_card["data"].pop("fingerprint")
    assert eager == lazy_card


def test_ood_caps_its_banks_and_says_so(shapes_quick):
    world, model = shapes_quick
    opts = {"monitoring.ood": {"bank_size": 50, "rmd_fit_size": 40}}
    engine = Engine(progress=False)
    card = run_audit(model, world, checks="monitoring.ood", engine=engine, options=opts).card
    limits = card["checks"]["monitoring.ood"]["limits"]
    n_train = card["data"]["splits"]["train"]
    assert limits["kNN bank (train split)"].startswith("50 of ")
    assert int(limits["kNN bank (train split)"].split()[2]) <= n_train
    assert limits["RMD fit (calibration split)"].startswith("40 of ")
    # only the sampled bank rows of the train split were encoded for kNN
    assert engine.accounting()["modalities"]["image"]["rows_encoded"] < n_train
    full = run_audit(model, world, checks="monitoring.ood", engine=Engine(progress=False)).card
    assert "limits" not in full["checks"]["monitoring.ood"]
    capped = card["checks"]["monitoring.ood"]["metrics"]["knn/auroc"]["value"]
    uncapped = full["checks"]["monitoring.ood"]["metrics"]["knn/auroc"]["value"]
    assert abs(capped - uncapped) < 0.15  # a sample of the bank keeps the score's power
    assert np.isfinite(capped)


def test_an_unknown_backend_is_a_user_error(tmp_path):
    from typer.testing import CliRunner

    from mmsafe.cli import app

    args = ["audit", "--data", "shapes:n=200", "--backend", "spark", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "unknown --backend 'spark'; choose local or ray" in result.output
    assert "Traceback" not in result.output


def test_an_unknown_precision_is_a_user_error(tmp_path):
    from typer.testing import CliRunner

    from mmsafe.cli import app

    args = ["audit", "--data", "shapes:n=200", "--precision", "int8", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2
    assert "--precision 'int8': choose fp32, bf16, fp16" in result.output
