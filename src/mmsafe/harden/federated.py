"""Federated training of a fusion head with Flower (flwr) in simulation mode.

:func:`federated_fit_fusion_head` trains the same :class:`~mmsafe.models.heads.FusionHead` as
:func:`~mmsafe.models.heads.fit_fusion_head`, but the training rows are split over ``n_clients``
simulated clients that never share them. Everything federated is Flower's own machinery: a
``ServerApp`` running the :class:`flwr.serverapp.strategy.FedAvg` strategy, a ``ClientApp``
that trains locally, and :func:`flwr.simulation.run_simulation` (Ray backend) to run the
federation in one process tree. Nothing here re-implements a federated loop::

    head, report = federated_fit_fusion_head(
        {"image": img, "text": txt}, labels, n_clients=4, missing={1: ("text",)},
        test_embeddings={"image": img_te, "text": txt_te}, test_labels=y_te,
    )
    report.centralised_accuracy, report.federated_accuracy

Two kinds of heterogeneity are simulated:

* **non-IID labels**: the rows of each class are spread over the clients with proportions
  drawn from a Dirichlet(``alpha``) distribution (small ``alpha``: each client sees few
  classes), the usual benchmark split (Hsu et al., 2019);
* **missing modalities**: ``missing={client: (modality, ...)}`` clients never observe those
  modalities. Their rows carry the head's *null embedding* for them, exactly what
  :class:`~mmsafe.models.heads.FusionHead` substitutes for a missing modality at prediction
  time, so a missing modality is the same thing in training and in use.

The null embedding (the training mean of each modality) and the RMS scale that the head
standardises with are computed federatedly too, before training: the server sends a Flower
``query`` message and each client answers with sums and counts over the modalities it has.
Clients send sums, not rows, but this is not secure aggregation and not differential privacy.

The report compares, on the same test rows, the federated head with a **centralised** head
(:func:`~mmsafe.models.heads.fit_fusion_head` on the pooled rows, the same missing modalities
null-embedded, the same total number of epochs).

Requires the optional dependency ``flwr[simulation]`` (tested with flwr 1.41.0 and ray 2.55.1).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmsafe.models.heads import (
    FusionHead,
    HeadTrainConfig,
    check_inputs,
    fit_fusion_head,
    head_config,
)

__all__ = [
    "FEDERATED_DEFAULTS",
    "FederatedReport",
    "dirichlet_split",
    "federated_fit_fusion_head",
]


FEDERATED_DEFAULTS = HeadTrainConfig(epochs=5, batch_size=64)
"""The local recipe of :func:`federated_fit_fusion_head`: 5 local epochs, batches of 64."""


@dataclass(frozen=True)
class FederatedReport:
    """Centralised versus federated training of one fusion head.

    Attributes:
        n_clients: Simulated clients.
        rounds: FedAvg rounds.
        local_epochs: Local epochs per client per round.
        alpha: Dirichlet concentration of the label split (``inf`` = IID).
        client_sizes: Training rows per client.
        client_classes: Number of distinct classes per client.
        missing: ``{client: modalities}`` each client never observes.
        centralised_accuracy: Test accuracy of the head trained on the pooled rows.
        federated_accuracy: Test accuracy of the FedAvg head.
        accuracy_gap: ``centralised - federated``.
        per_round_accuracy: Test accuracy of the global head after each round.
        n_train: Labelled training rows (all clients).
        n_test: Labelled test rows.
        seconds: Wall time of the federated simulation (Ray start-up included).
        flwr_version: Version of flwr that ran the federation.
    """

    n_clients: int
    rounds: int
    local_epochs: int
    alpha: float
    client_sizes: tuple[int, ...]
    client_classes: tuple[int, ...]
    missing: dict[int, tuple[str, ...]]
    centralised_accuracy: float
    federated_accuracy: float
    accuracy_gap: float
    per_round_accuracy: tuple[float, ...]
    n_train: int
    n_test: int
    seconds: float
    flwr_version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["missing"] = {str(k): list(v) for k, v in self.missing.items()}
        return d


def dirichlet_split(
    labels: Any, n_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Split row indices over clients, class by class, with Dirichlet(``alpha``) proportions.

    Redraws (up to 100 times) until every client has at least ``min_size`` rows.
    ``alpha=inf`` gives an IID split (a random permutation cut into near-equal parts).

    Args:
        labels: ``(N,)`` class indices.
        n_clients: Number of clients.
        alpha: Dirichlet concentration (smaller: more skewed label distributions).
        seed: Seed of the split.
        min_size: Fewest rows any client may get.

    Returns:
        ``n_clients`` sorted index arrays that partition ``range(N)``.

    Example:
        >>> parts = dirichlet_split(np.repeat([0, 1, 2], 20), 3, alpha=0.5, seed=0)
        >>> sorted(np.concatenate(parts).tolist()) == list(range(60))
        True
    """
    y = np.asarray(labels, dtype=np.int64)
    if n_clients < 1 or alpha <= 0 or y.ndim != 1:
        raise ValueError(
            f"Need n_clients >= 1, alpha > 0 and 1-D labels; got {n_clients}, {alpha}."
        )
    if y.size < n_clients * min_size:
        raise ValueError(f"{y.size} rows cannot give {n_clients} clients {min_size} rows each.")
    rng = np.random.default_rng(seed)
    if np.isinf(alpha):
        return [np.sort(p) for p in np.array_split(rng.permutation(y.size), n_clients)]
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(y):
            rows = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * rows.size).astype(int)[:-1]
            for k, chunk in enumerate(np.split(rows, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"No Dirichlet(alpha={alpha}) split gave every one of {n_clients} clients {min_size} "
        "rows in 100 draws; raise alpha or lower n_clients."
    )


def _accuracy(head: FusionHead, emb: Mapping[str, Tensor], y: Tensor) -> float:
    with torch.no_grad():
        return float(head(emb).argmax(-1).eq(y).float().mean())


def federated_fit_fusion_head(
    train_embeddings: Mapping[str, Tensor],
    labels: Tensor,
    config: HeadTrainConfig = FEDERATED_DEFAULTS,
    *,
    test_embeddings: Mapping[str, Tensor],
    test_labels: Tensor,
    n_clients: int = 4,
    alpha: float = 0.5,
    missing: Mapping[int, Sequence[str]] | None = None,
    rounds: int = 5,
    num_cpus: int = 1,
    startup_timeout: float = 120.0,
    **options: Any,
) -> tuple[FusionHead, FederatedReport]:
    """Train a fusion head with FedAvg over simulated non-IID clients (flwr simulation).

    Args:
        train_embeddings: ``{modality: (N, D_m)}`` training embeddings (all clients' rows).
        labels: ``(N,)`` class indices, ``-1`` = unlabelled (dropped).
        test_embeddings: ``{modality: (M, D_m)}`` held-out rows for the accuracies.
        test_labels: ``(M,)`` their classes (``-1`` rows dropped).
        n_clients: Simulated clients (Flower SuperNodes).
        alpha: Dirichlet concentration of the label split; ``float("inf")`` = IID.
        missing: ``{client index: modalities}`` that client never observes.
        config: The head and its local recipe (default :data:`FEDERATED_DEFAULTS`):
            ``epochs`` are each client's local passes over its rows per round, and the
            AdamW optimiser is re-created each round (each round is one
            :func:`~mmsafe.models.heads.fit_fusion_head` call continuing the global head);
            ``seed`` seeds the split, the initial head and local shuffling. The centralised
            reference trains ``rounds * epochs`` epochs with the same recipe.
        rounds: FedAvg rounds (every client trains in every round).
        num_cpus: CPUs Ray may use (clients run one per CPU).
        startup_timeout: Seconds to wait for the simulated clients to register.
        **options: Fields of :class:`~mmsafe.models.heads.HeadTrainConfig` overriding
            ``config``'s (``epochs=3``, ``num_classes=5``, ...).

    Returns:
        ``(head, report)``: the global FedAvg head in eval mode and a :class:`FederatedReport`.

    Raises:
        ImportError: flwr (with its simulation extra) is not installed.
        ValueError: bad settings (unknown client or modality in ``missing``, a client that
            misses every modality, too few rows).
    """
    try:
        import flwr
        from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
        from flwr.clientapp import ClientApp
        from flwr.serverapp import Grid, ServerApp
        from flwr.serverapp.strategy import FedAvg
        from flwr.simulation import run_simulation
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Federated training needs Flower: pip install 'flwr[simulation]==1.41.0'."
        ) from err

    config = config.replace(**options)
    seed = config.seed
    embs, y = check_inputs(train_embeddings, labels)
    test_embs, y_test = check_inputs(test_embeddings, test_labels)
    mods = tuple(embs)
    missing = {int(k): tuple(v) for k, v in (missing or {}).items()}
    for k, ms in missing.items():
        if not 0 <= k < n_clients:
            raise ValueError(f"missing names client {k}, but clients are 0..{n_clients - 1}.")
        if set(ms) - set(mods):
            raise ValueError(f"Client {k} misses unknown modalities {sorted(set(ms) - set(mods))}.")
        if set(ms) >= set(mods):
            raise ValueError(f"Client {k} would miss every modality; keep at least one.")
    if rounds < 1:
        raise ValueError(f"Need rounds >= 1, got {rounds}.")
    cfg = head_config(embs, y, config)
    parts = dirichlet_split(y.numpy(), n_clients, alpha, seed=seed, min_size=2)
    client_data = [
        ({m: x[torch.as_tensor(idx)] for m, x in embs.items() if m not in missing.get(k, ())},
         y[torch.as_tensor(idx)])
        for k, idx in enumerate(parts)
    ]  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = FusionHead(cfg)

    # ------------------------------------------------------------------ the ClientApp
    client_app = ClientApp()

    def _client(context: Context) -> tuple[int, dict[str, Tensor], Tensor]:
        k = int(context.node_config["partition-id"])
        data, yk = client_data[k]
        return k, data, yk

    @client_app.query()
    def statistics(msg: Message, context: Context) -> Message:
        """Per-modality sums over the modalities this client has (for the null embedding)."""
        _, data, yk = _client(context)
        arrays = {f"sum/{m}": x.sum(0) for m, x in data.items()}
        metrics = {f"n/{m}": float(x.shape[0]) for m, x in data.items()}
        if "centre" in msg.content:
            centre = msg.content["centre"].to_torch_state_dict()
            for m, x in data.items():
                metrics[f"sq/{m}"] = float((x - centre[m]).pow(2).sum())
        return Message(
            RecordDict({"sums": ArrayRecord(arrays), "counts": MetricRecord(metrics)}),
            reply_to=msg,
        )

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        """Local AdamW epochs from the global head; replies with the new weights."""
        k, data, yk = _client(context)
        head = FusionHead(cfg)
        head.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rnd = int(msg.content["config"].get("server-round", 0))
        null = head.null_embeddings
        full = {m: data.get(m, null[m].expand(yk.shape[0], -1)) for m in mods}
        local = config.replace(seed=seed * 100_003 + rnd * 1_009 + k)
        head = fit_fusion_head(full, yk, local, head=head)
        reply = RecordDict(
            {
                "arrays": ArrayRecord(head.state_dict()),
                "metrics": MetricRecord({"num-examples": int(yk.shape[0])}),
            }
        )
        return Message(reply, reply_to=msg)

    # ------------------------------------------------------------------ the ServerApp
    server_app = ServerApp()
    outcome: dict[str, Any] = {}

    def _query(grid: Grid, content: RecordDict) -> list[RecordDict]:
        node_ids = list(grid.get_node_ids())
        deadline = time.monotonic() + startup_timeout
        while len(node_ids) < n_clients and time.monotonic() < deadline:
            time.sleep(0.2)  # the simulated SuperNodes register after the ServerApp starts
            node_ids = list(grid.get_node_ids())
        if len(node_ids) < n_clients:
            raise RuntimeError(
                f"Only {len(node_ids)} of {n_clients} simulated clients came up within "
                f"{startup_timeout:g} s."
            )
        msgs = [Message(content, dst_node_id=n, message_type="query") for n in node_ids]
        replies = list(grid.send_and_receive(msgs))
        bad = [r.error for r in replies if r.has_error()]
        if bad:
            raise RuntimeError(f"A client failed to answer the statistics query: {bad[0]}")
        return [r.content for r in replies]

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        # 1. federated statistics: mean (null embedding), then RMS scale around it
        n = dict.fromkeys(mods, 0.0)
        total = {m: torch.zeros(d) for m, d in zip(mods, cfg.dims, strict=True)}
        for rec in _query(grid, RecordDict({"config": ConfigRecord({})})):
            sums, counts = rec["sums"].to_torch_state_dict(), rec["counts"]
            for m in mods:
                if f"n/{m}" in counts:
                    n[m] += float(counts[f"n/{m}"])
                    total[m] += sums[f"sum/{m}"]
        if min(n.values()) == 0:
            raise RuntimeError(f"No client reported statistics for some modality: {n}.")
        centre = {m: total[m] / n[m] for m in mods}
        sq = dict.fromkeys(mods, 0.0)
        for rec in _query(grid, RecordDict({"centre": ArrayRecord(centre)})):
            counts = rec["counts"]
            for m in mods:
                if f"sq/{m}" in counts:
                    sq[m] += float(counts[f"sq/{m}"])
        scale = {m: max((sq[m] / n[m]) ** 0.5, 1e-6) for m in mods}
        init.set_statistics(centre, scale)
        # 2. FedAvg
        round_acc: list[float] = []

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            if server_round > 0:
                head = FusionHead(cfg)
                head.load_state_dict(arrays.to_torch_state_dict())
                round_acc.append(_accuracy(head.eval(), test_embs, y_test))
            return MetricRecord({})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n_clients)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(init.state_dict()),
            num_rounds=rounds,
            evaluate_fn=evaluate,
        )
        outcome["state"] = result.arrays.to_torch_state_dict()
        outcome["round_accuracy"] = round_acc
        outcome["null"], outcome["scale"] = centre, scale

    start = time.perf_counter()
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": int(num_cpus), "include_dashboard": False},
            },
        )
    finally:
        flwr_logger.setLevel(level)
    seconds = time.perf_counter() - start
    if "state" not in outcome:
        raise RuntimeError("The Flower simulation ended without a trained head (see its log).")

    head = FusionHead(cfg)
    head.load_state_dict(outcome["state"])
    head.eval()
    fed_acc = _accuracy(head, test_embs, y_test)

    # Centralised reference: the pooled rows, the same missing modalities null-embedded.
    null = {m: outcome["null"][m] for m in mods}
    pooled = {
        m: torch.cat([d.get(m, null[m].expand(yk.shape[0], -1)) for d, yk in client_data])
        for m in mods
    }
    pooled_y = torch.cat([yk for _, yk in client_data])
    central = fit_fusion_head(
        pooled, pooled_y, config, num_classes=cfg.num_classes, epochs=rounds * config.epochs
    )
    central_acc = _accuracy(central, test_embs, y_test)
    report = FederatedReport(
        n_clients=n_clients,
        rounds=rounds,
        local_epochs=config.epochs,
        alpha=float(alpha),
        client_sizes=tuple(int(yk.shape[0]) for _, yk in client_data),
        client_classes=tuple(int(torch.unique(yk).numel()) for _, yk in client_data),
        missing=missing,
        centralised_accuracy=central_acc,
        federated_accuracy=fed_acc,
        accuracy_gap=central_acc - fed_acc,
        per_round_accuracy=tuple(outcome["round_accuracy"]),
        n_train=int(y.shape[0]),
        n_test=int(y_test.shape[0]),
        seconds=seconds,
        flwr_version=str(flwr.__version__),
        extra={"scale": {m: float(v) for m, v in outcome["scale"].items()}},
    )
    head.fit_info = {"federated": report.to_dict(), **config.settings()}
    return head, report
