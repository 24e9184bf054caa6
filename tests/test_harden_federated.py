"""Federated training of a fusion head (mmsafe.harden.federated) with flwr's simulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmsafe.harden.federated import dirichlet_split
from tests.conftest import require


def test_dirichlet_split_partitions_and_skews() -> None:
    y = np.repeat(np.arange(5), 60)
    parts = dirichlet_split(y, 4, alpha=0.3, seed=0, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(y.size))
    assert min(len(p) for p in parts) >= 5
    # a skewed split: the clients' label histograms are far from the pooled uniform one
    hist = np.stack([np.bincount(y[p], minlength=5) / len(p) for p in parts])
    assert np.abs(hist - 0.2).sum(1).mean() > 0.4
    iid = dirichlet_split(y, 4, alpha=float("inf"), seed=0)
    assert [len(p) for p in iid] == [75] * 4
    assert dirichlet_split(y, 4, 0.3, seed=0)[0].tolist() == parts[0].tolist()
    with pytest.raises(ValueError):
        dirichlet_split(y, 0, 0.3)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_split(y[:3], 4, 0.3)


@pytest.fixture(scope="session")
def flwr_simulation():
    """Fail (before the session's tiny-clip is trained) when flwr[simulation] is absent."""
    require("ray")  # flwr's simulation mode runs on ray (flwr[simulation])
    return require("flwr")


def test_federated_head_on_shapes_with_missing_modalities(flwr_simulation, shapes_quick) -> None:
    """Measured (quick world, 4 clients, alpha 0.5, text missing on client 1 and image on
    client 3, 4 rounds x 3 local epochs): centralised 0.765, federated 0.741 (per round 0.698,
    0.716, 0.722, 0.741); with an IID split both reach 0.765."""
    from mmsafe.audit import evaluation_splits
    from mmsafe.engine import Engine
    from mmsafe.harden.federated import federated_fit_fusion_head

    world, model = shapes_quick
    test, _, train = evaluation_splits(world)
    engine = Engine(progress=False)
    x_tr = engine.embed(model, train, ("image", "text"))
    x_te = engine.embed(model, test, ("image", "text"))
    y_tr, y_te = torch.as_tensor(train.labels), torch.as_tensor(test.labels)
    missing = {1: ("text",), 3: ("image",)}
    head, report = federated_fit_fusion_head(
        x_tr,
        y_tr,
        test_embeddings=x_te,
        test_labels=y_te,
        n_clients=4,
        alpha=0.5,
        missing=missing,
        rounds=4,
        epochs=3,
        num_cpus=1,
        num_classes=len(world.classes),
    )
    assert report.n_clients == 4 and len(report.per_round_accuracy) == 4
    assert sum(report.client_sizes) == report.n_train == int((y_tr >= 0).sum())
    assert min(report.client_classes) < 5  # non-IID: some client lacks a class
    assert report.missing == missing
    # FedAvg learns the task, and lands near the centralised head trained on the same rows
    assert report.federated_accuracy > 0.5
    assert report.centralised_accuracy > 0.5
    assert report.accuracy_gap < 0.2
    assert report.federated_accuracy == pytest.approx(report.per_round_accuracy[-1])
    # the null embedding was aggregated over the clients that observe each modality
    keep = (y_tr >= 0).numpy()
    parts = dirichlet_split(y_tr.numpy()[keep], 4, 0.5, seed=0, min_size=2)
    for m, skip in (("text", 1), ("image", 3)):
        rows = np.concatenate([p for k, p in enumerate(parts) if k != skip])
        expected = x_tr[m][torch.as_tensor(np.flatnonzero(keep))][torch.as_tensor(rows)].mean(0)
        torch.testing.assert_close(head.null_embeddings[m], expected, atol=1e-5, rtol=1e-5)
    json.dumps(report.to_dict())
    assert head({"image": x_te["image"][:3]}).shape == (3, 5)
