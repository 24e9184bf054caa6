"""Sample quality of generated images from feature matrices: FID, KID, CMMD, precision / recall.

Every function takes two ``(N, D)`` feature matrices (numpy or torch), ``real`` and ``fake``,
produced by an *injected* feature extractor (:func:`extract_features`), so no Inception network
is ever downloaded; which extractor produced them is the caller's business (an Inception, a CLIP
image tower, or the audited encoder). All arithmetic is float64.

* **FID** (Heusel et al., 2017) :func:`fid`: the Fréchet distance between Gaussians fitted to
  the two sets, computed exactly as torchmetrics' ``FrechetInceptionDistance`` does
  (``tr sqrt(S1 S2)`` as the sum of the square roots of the eigenvalues of ``S1 S2``). Biased
  upwards at small ``N`` (:func:`quality_vs_sample_size` shows by how much).
* **KID** (Bińkowski et al., 2018) :func:`kid`: the unbiased MMD² with the cubic polynomial
  kernel, averaged over random subsets; the same subsets as torchmetrics'
  ``KernelInceptionDistance`` after ``torch.manual_seed(seed)``, hence the same value.
* **CMMD** (Jayasumana et al., CVPR 2024, "Rethinking FID") :func:`cmmd`: MMD² with a Gaussian
  RBF kernel (``sigma = 10``) scaled by 1000, the minimum-variance (V-statistic) estimator of the
  official ``google-research/cmmd`` ``distance.py``; meant for CLIP embeddings (unit norm).
* **Precision / recall** (Kynkäänniemi et al., NeurIPS 2019) :func:`precision_recall` and
  **density / coverage** (Naeem et al., ICML 2020) :func:`density_coverage`: k-nearest-neighbour
  balls around each sample as an estimate of each set's support (:func:`knn_radii`).

:func:`quality_metrics` computes any of them at once, :func:`quality_bootstrap` gives percentile
bootstrap intervals (rows of each set resampled independently), and
:func:`quality_vs_sample_size` the figures at ``N/8, N/4, N/2, N``.

torchmetrics can be run on the same extractor for reference: :func:`torchmetrics_feature` wraps
any ``nn.Module`` so ``FrechetInceptionDistance(feature=...)`` and
``KernelInceptionDistance(feature=...)`` use it (no torch-fidelity needed).

Example:
    >>> rng = np.random.default_rng(0)
    >>> real, fake = rng.normal(size=(200, 4)), rng.normal(0.5, 1.0, size=(200, 4))
    >>> round(fid(real, real), 6), fid(real, fake) > 0.5
    (0.0, True)
    >>> m = quality_metrics(real, real, metrics=("precision", "recall"))
    >>> m["precision"], m["recall"]
    (1.0, 1.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy.spatial.distance import cdist
from torch import Tensor, nn

from mmsafe.metrics.arrays import as_numpy as _as_numpy
from mmsafe.metrics.bootstrap import check_options as _check_options
from mmsafe.metrics.bootstrap import percentile_interval as _percentile_interval

__all__ = [
    "QUALITY_METRICS",
    "cmmd",
    "density_coverage",
    "extract_features",
    "fid",
    "kid",
    "knn_radii",
    "precision_recall",
    "quality_bootstrap",
    "quality_metrics",
    "quality_vs_sample_size",
    "torchmetrics_feature",
]

QUALITY_METRICS: tuple[str, ...] = (
    "fid",
    "kid",
    "cmmd",
    "precision",
    "recall",
    "density",
    "coverage",
)
"""The metrics :func:`quality_metrics` knows; lower is better for the first three."""

CMMD_SIGMA = 10.0
"""Bandwidth of CMMD's Gaussian RBF kernel (``_SIGMA`` of the official code)."""
CMMD_SCALE = 1000.0
"""CMMD's readability scale (``_SCALE`` of the official code)."""

_BLOCK = 2048  # rows per block of a kernel sum (bounds memory at 2048 x M floats)


# ------------------------------------------------------------------------------ inputs
def _features(x: Any, name: str, *, min_rows: int = 2) -> np.ndarray:
    arr = _as_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be an (N, D) feature matrix, got shape {arr.shape}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"`{name}` must be numeric, got dtype {arr.dtype}.")
    if arr.shape[0] < min_rows:
        raise ValueError(f"`{name}` needs at least {min_rows} rows, got {arr.shape[0]}.")
    if arr.shape[1] < 1:
        raise ValueError(f"`{name}` has no feature columns (D = 0).")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")
    return arr


def _pair(real: Any, fake: Any, *, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    r = _features(real, "real", min_rows=min_rows)
    f = _features(fake, "fake", min_rows=min_rows)
    if r.shape[1] != f.shape[1]:
        raise ValueError(
            f"`real` and `fake` must have the same number of features, got {r.shape[1]} and "
            f"{f.shape[1]}."
        )
    return r, f


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return int(value)


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return float(value)


# ------------------------------------------------------------------------------ extractors
def extract_features(
    extractor: Callable[[Tensor], Tensor],
    images: Any,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor:
    """Run a feature extractor over images in batches, without gradients.

    Args:
        extractor: maps a batch of images to ``(B, D)`` features (or anything reshaped to it);
            an ``nn.Module`` is put in eval mode for the call and restored afterwards.
        images: ``(N, ...)`` tensor or array the extractor accepts (e.g. ``(N, 3, H, W)`` float
            pixels in ``[0, 1]``).
        batch_size: rows per forward pass.
        device: where to run the batches (default: where ``images`` are).

    Returns:
        ``(N, D)`` float64 CPU features.

    Raises:
        ValueError: empty images or a bad ``batch_size``.

    Example:
        >>> extract_features(nn.Flatten(), torch.zeros(5, 3, 2, 2), batch_size=2).shape
        torch.Size([5, 12])
    """
    bs = _positive_int(batch_size, "batch_size")
    x = images if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError("`images` is empty: nothing to extract features from.")
    was_training = isinstance(extractor, nn.Module) and extractor.training
    if isinstance(extractor, nn.Module):
        extractor.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], bs):
                batch = x[start : start + bs]
                if device is not None:
                    batch = batch.to(device)
                feats = extractor(batch)
                out.append(feats.reshape(batch.shape[0], -1).detach().to("cpu", torch.float64))
    finally:
        if was_training and isinstance(extractor, nn.Module):
            extractor.train()
    return torch.cat(out)


class _TorchmetricsFeature(nn.Module):
    """An extractor as torchmetrics' ``feature=`` wants it: ``num_features`` and float64 rows."""

    def __init__(self, extractor: nn.Module, num_features: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.extractor(x).reshape(x.shape[0], -1).to(torch.float64)

    def train(self, mode: bool = True) -> _TorchmetricsFeature:
        """Stay in eval mode (torchmetrics calls ``.train()`` through the metric)."""
        return super().train(False)


def torchmetrics_feature(
    extractor: nn.Module, *, num_features: int | None = None, example: Tensor | None = None
) -> nn.Module:
    """Wrap a feature extractor for torchmetrics' ``FrechetInceptionDistance(feature=...)``.

    What torchmetrics (1.x) needs of a custom ``feature`` module, and what the wrapper gives it:

    * any ``nn.Module`` whose ``forward`` maps a batch to ``(N, D)``: torchmetrics passes the
      ``update`` input to it unchanged (with ``normalize`` irrelevant), so images of any size
      or even precomputed features (with ``nn.Identity()``) work, and **torch-fidelity is not
      needed** (only the integer ``feature=2048`` Inception requires it);
    * a ``num_features`` attribute (int): without it FID probes the module with a random
      ``(1, 3, 299, 299)`` uint8 image, which a small extractor rejects;
    * float64 output: FID keeps its sums in float64 but casts the result back to the features'
      dtype, and KID computes its kernels in that dtype, so float32 features would cost digits;
    * eval mode and no gradients (``Metric.train()`` would otherwise switch BatchNorm/dropout).

    Args:
        extractor: the feature extractor.
        num_features: ``D``; inferred from ``extractor.num_features`` or from one forward pass
            on ``example`` when omitted.
        example: a small input batch to infer ``D`` from.

    Returns:
        The wrapping module.

    Raises:
        ValueError: ``D`` cannot be inferred or is not positive.

    Example:
        >>> from torchmetrics.image.fid import FrechetInceptionDistance
        >>> metric = FrechetInceptionDistance(feature=torchmetrics_feature(nn.Identity(),
        ...                                                                num_features=3))
        >>> x = torch.randn(50, 3, dtype=torch.float64)
        >>> metric.update(x, real=True); metric.update(x + 1, real=False)
        >>> round(float(metric.compute()), 6)
        3.0
    """
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"`extractor` must be an nn.Module, got {type(extractor).__name__}.")
    if num_features is None:
        attr = getattr(extractor, "num_features", None)
        if isinstance(attr, numbers.Integral) and not isinstance(attr, bool):
            num_features = int(attr)
        elif example is not None:
            was_training = extractor.training
            extractor.eval()
            with torch.no_grad():
                num_features = int(extractor(example).reshape(example.shape[0], -1).shape[1])
            extractor.train(was_training)
        else:
            raise ValueError(
                "Cannot infer the feature dimension: pass `num_features=` or an `example` batch."
            )
    extractor.eval()
    return _TorchmetricsFeature(extractor, _positive_int(num_features, "num_features"))


# ------------------------------------------------------------------------------ FID
def _moments(x: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance, rows weighted by their counts ``w`` (a resample)."""
    if w is None:
        mu = x.mean(axis=0)
        xc = x - mu
        return mu, xc.T @ xc / (x.shape[0] - 1)
    n = w.sum()
    mu = w @ x / n
    xc = x - mu
    return mu, (xc.T * w) @ xc / (n - 1)


def _fid_from_moments(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    diff = mu1 - mu2
    eig = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(eig).real.sum())


def fid(real: Any, fake: Any) -> float:
    r"""Fréchet distance between Gaussians fitted to two feature sets (FID on given features).

    .. math::
        \mathrm{FID} = \|\mu_r - \mu_f\|^2 + \mathrm{tr}(\Sigma_r + \Sigma_f)
        - 2 \sum_i \sqrt{\lambda_i(\Sigma_r \Sigma_f)}

    with unbiased (``N - 1``) covariances; the trace of the matrix square root is taken from the
    eigenvalues of ``Sigma_r Sigma_f`` (real part of their complex square roots), as torchmetrics
    does, which stays stable where ``N < D`` makes the covariances singular. Equals torchmetrics'
    ``FrechetInceptionDistance`` on the same features (see :func:`torchmetrics_feature`). It can
    come out a hair below 0 (rounding) for identical sets.

    Args:
        real: ``(N, D)`` features of real images, ``N >= 2``.
        fake: ``(M, D)`` features of generated images, ``M >= 2``.

    Returns:
        The FID (squared units of the features).

    Raises:
        ValueError: not 2-D, fewer than 2 rows, mismatched ``D``, NaN or infinite values.

    Example:
        >>> fid(np.array([[0.0, 0.0], [2.0, 0.0]]), np.array([[1.0, 1.0], [3.0, 1.0]]))
        2.0
    """
    r, f = _pair(real, fake)
    return _fid_from_moments(*_moments(r), *_moments(f))


# ------------------------------------------------------------------------------ KID
def _poly_kernel(a: Tensor, b: Tensor, degree: int, gamma: float, coef: float) -> Tensor:
    return (a @ b.T * gamma + coef) ** degree


def _mmd2_unbiased(k_xx: Tensor, k_xy: Tensor, k_yy: Tensor) -> Tensor:
    """Unbiased MMD² (torchmetrics' ``maximum_mean_discrepancy`` for ``n == m``)."""
    n, m = k_xx.shape[0], k_yy.shape[0]
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return xx + yy - 2.0 * k_xy.sum() / (n * m)


def kid(
    real: Any,
    fake: Any,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance on given features: mean and std of the unbiased MMD² over subsets.

    The kernel is ``k(x, y) = (gamma <x, y> + coef) ** degree`` (``gamma = 1 / D`` by default).
    Each of ``subsets`` rounds draws ``subset_size`` rows of each set without replacement and
    computes the unbiased MMD²; the result is the mean and the population std (``ddof = 0``) of
    those values. The subsets are ``torch.randperm`` draws from a generator seeded with ``seed``,
    real then fake in every round, exactly as torchmetrics' ``KernelInceptionDistance`` draws
    them from the global generator, so after ``torch.manual_seed(seed)`` both agree to rounding.

    Args:
        real: ``(N, D)`` features, ``N >= 2``.
        fake: ``(M, D)`` features, ``M >= 2``.
        subsets: number of rounds.
        subset_size: rows per subset; default ``min(1000, N, M)``.
        degree: degree of the polynomial kernel.
        gamma: kernel scale; default ``1 / D``.
        coef: kernel offset.
        seed: seed of the subset draws.

    Returns:
        ``(kid_mean, kid_std)``.

    Raises:
        ValueError: bad features, or ``subset_size`` outside ``[2, min(N, M)]``, or bad options.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(100, 8))
        >>> mean, std = kid(x, x + 1.0, subsets=5, subset_size=50)
        >>> mean > 0.5 > kid(x, x, subsets=5, subset_size=50)[0]
        True
    """
    r, f = _pair(real, fake)
    n_sub = _positive_int(subsets, "subsets")
    deg = _positive_int(degree, "degree")
    size = min(1000, r.shape[0], f.shape[0]) if subset_size is None else subset_size
    size = _positive_int(size, "subset_size")
    if not 2 <= size <= min(r.shape[0], f.shape[0]):
        raise ValueError(
            f"`subset_size` must be in [2, min(N_real, N_fake)] = [2, "
            f"{min(r.shape[0], f.shape[0])}], got {size}."
        )
    g = 1.0 / r.shape[1] if gamma is None else _positive_float(gamma, "gamma")
    c = float(coef)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    rt, ft = torch.from_numpy(r), torch.from_numpy(f)
    gen = torch.Generator().manual_seed(int(seed))
    scores = []
    for _ in range(n_sub):
        xr = rt[torch.randperm(rt.shape[0], generator=gen)[:size]]
        xf = ft[torch.randperm(ft.shape[0], generator=gen)[:size]]
        k_rr = _poly_kernel(xr, xr, deg, g, c)
        k_ff = _poly_kernel(xf, xf, deg, g, c)
        k_rf = _poly_kernel(xr, xf, deg, g, c)
        scores.append(_mmd2_unbiased(k_rr, k_rf, k_ff))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))


# ------------------------------------------------------------------------------ CMMD
def _rbf_kernel(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma |a - b|^2)`` with the squared distance expanded as the official CMMD code."""
    a_sq = np.einsum("ij,ij->i", a, a)
    b_sq = np.einsum("ij,ij->i", b, b)
    return np.exp(-gamma * (-2.0 * a @ b.T + a_sq[:, None] + b_sq[None, :]))


def _kernel_mean(a: np.ndarray, b: np.ndarray, gamma: float) -> float:
    total = 0.0
    for start in range(0, a.shape[0], _BLOCK):
        total += float(_rbf_kernel(a[start : start + _BLOCK], b, gamma).sum())
    return total / (a.shape[0] * b.shape[0])


def cmmd(
    real: Any,
    fake: Any,
    *,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    normalize: bool = False,
) -> float:
    r"""CMMD: ``scale`` times the MMD² between the sets with a Gaussian RBF kernel.

    .. math::
        \mathrm{CMMD} = s \left( \overline{K_{rr}} + \overline{K_{ff}}
        - 2 \overline{K_{rf}} \right), \quad
        K(x, y) = \exp\left(-\frac{\|x - y\|^2}{2 \sigma^2}\right)

    where the bars are means over *all* entries, diagonals included: the minimum-variance
    (biased, V-statistic) estimator of Gretton et al. (2012, eq. 5) that the official
    ``google-research/cmmd`` ``distance.py`` computes, with its ``_SIGMA = 10`` and
    ``_SCALE = 1000``. It is never negative, and is above 0 for two finite different sets. The
    paper uses unit-norm CLIP ViT-L/14@336 image embeddings; ``normalize=True`` L2-normalises the
    rows first, for an extractor that does not.

    Args:
        real: ``(N, D)`` features.
        fake: ``(M, D)`` features.
        sigma: kernel bandwidth.
        scale: multiplier of the MMD².
        normalize: L2-normalise each row first.

    Returns:
        The CMMD.

    Raises:
        ValueError: bad features or non-positive ``sigma`` / ``scale``.

    Example:
        >>> x = np.array([[0.0, 0.0], [0.0, 10.0]])
        >>> round(cmmd(x, x), 12), round(cmmd(x[:1], x[1:]), 4)  # 1000 * (2 - 2 exp(-1/2))
        (0.0, 786.9387)
    """
    r, f = _pair(real, fake, min_rows=1)
    gamma = 1.0 / (2.0 * _positive_float(sigma, "sigma") ** 2)
    s = _positive_float(scale, "scale")
    if normalize:
        r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    k_rr = _kernel_mean(r, r, gamma)
    k_ff = _kernel_mean(f, f, gamma)
    k_rf = _kernel_mean(r, f, gamma)
    return s * (k_rr + k_ff - 2.0 * k_rf)


# ------------------------------------------------------------------------------ PR / DC
def knn_radii(features: Any, k: int) -> np.ndarray:
    """Distance from each row to its ``k``-th nearest *other* row (Euclidean).

    The radius of the ball around each sample in the k-NN support estimates of Kynkäänniemi et
    al. (2019) and Naeem et al. (2020). An exact duplicate row counts as a neighbour at distance
    0.

    Args:
        features: ``(N, D)`` features.
        k: neighbour rank, ``1 <= k < N``.

    Returns:
        ``(N,)`` radii.

    Raises:
        ValueError: bad features or ``k`` out of range.

    Example:
        >>> knn_radii(np.array([[0.0], [1.0], [3.0]]), 1).tolist()
        [1.0, 1.0, 2.0]
    """
    x = _features(features, "features")
    k = _check_k(k, x.shape[0], "features")
    return _radii(cdist(x, x), k)


def _check_k(k: Any, n: int, name: str) -> int:
    k = _positive_int(k, "k")
    if k >= n:
        raise ValueError(f"`k` must be smaller than the number of rows of `{name}` ({n}), got {k}.")
    return k


def _radii(d_self: np.ndarray, k: int) -> np.ndarray:
    """``k``-th smallest distance to another row: the ``(k+1)``-th of the row, self included."""
    return np.partition(d_self, k, axis=1)[:, k]


class _Manifold:
    """Distances of both sets, kept for the point estimate and every bootstrap resample."""

    def __init__(self, r: np.ndarray, f: np.ndarray) -> None:
        self.d_rr = cdist(r, r)
        self.d_ff = cdist(f, f)
        self.d_rf = cdist(r, f)

    def compute(
        self,
        wr: np.ndarray,
        wf: np.ndarray,
        *,
        k_pr: int | None,
        k_dc: int | None,
    ) -> dict[str, float]:
        """PR (with ``k_pr``) and DC (with ``k_dc``) with rows weighted by resample counts.

        The support estimate (the balls) is built from the distinct rows drawn (count > 0): a
        row drawn twice is neither its own nearest neighbour nor two balls, so density still
        counts how many *balls* hold a fake sample. The averages (precision over fake rows,
        recall and coverage over real rows, density over fake rows) count each row as often as
        it was drawn. With all counts 1 this is the plain definition.
        """
        pr_idx, pf_idx = np.flatnonzero(wr), np.flatnonzero(wf)
        n, m = wr.sum(), wf.sum()
        d_rf = self.d_rf[np.ix_(pr_idx, pf_idx)]
        wr_p, wf_p = wr[pr_idx], wf[pf_idx]
        out: dict[str, float] = {}
        if k_pr is not None:
            kk = min(k_pr, len(pr_idx) - 1, len(pf_idx) - 1)
            r_real = _radii(self.d_rr[np.ix_(pr_idx, pr_idx)], kk)
            r_fake = _radii(self.d_ff[np.ix_(pf_idx, pf_idx)], kk)
            in_real = (d_rf <= r_real[:, None]).any(axis=0)
            in_fake = (d_rf <= r_fake[None, :]).any(axis=1)
            out["precision"] = float(wf_p @ in_real / m)
            out["recall"] = float(wr_p @ in_fake / n)
        if k_dc is not None:
            kk = min(k_dc, len(pr_idx) - 1)
            r_real = _radii(self.d_rr[np.ix_(pr_idx, pr_idx)], kk)
            inside = d_rf <= r_real[:, None]  # (real, fake): fake j in the ball of real i
            out["density"] = float(inside.sum(axis=0) @ wf_p / (kk * m))
            out["coverage"] = float(wr_p @ inside.any(axis=1) / n)
        return out


def precision_recall(real: Any, fake: Any, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with ``k``-NN balls.

    Each sample gets a ball whose radius is the distance to its ``k``-th nearest neighbour in
    its own set (:func:`knn_radii`). Precision is the share of fake samples inside at least one
    real ball (fidelity); recall is the share of real samples inside at least one fake ball
    (diversity). Boundaries count as inside (``<=``), as in the authors' code.

    Args:
        real: ``(N, D)`` features.
        fake: ``(M, D)`` features.
        k: neighbour rank (the paper uses 3), smaller than ``N`` and ``M``.

    Returns:
        ``{"precision": p, "recall": r}``, both in ``[0, 1]``.

    Raises:
        ValueError: bad features or ``k``.

    Example:
        >>> real = np.array([[0.0], [1.0], [2.0]])
        >>> precision_recall(real, np.array([[1.5], [1.6], [9.0]]), k=1)
        {'precision': 0.6666666666666666, 'recall': 0.3333333333333333}
    """
    r, f = _pair(real, fake)
    k = _check_k(k, min(r.shape[0], f.shape[0]), "real` / `fake")
    return _Manifold(r, f).compute(np.ones(r.shape[0]), np.ones(f.shape[0]), k_pr=k, k_dc=None)


def density_coverage(real: Any, fake: Any, *, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al., 2020) with ``k``-NN balls around the *real* samples.

    Density is ``(1 / (k M)) sum_j sum_i 1[fake_j in B(real_i)]``: how many real balls a fake
    sample falls in, over ``k`` (about 1 when the sets match; above 1 when fakes crowd the
    dense regions; unbounded). Coverage is the share of real balls holding at least one fake
    sample. Only real balls are used, so fake outliers cannot inflate either.

    Args:
        real: ``(N, D)`` features.
        fake: ``(M, D)`` features.
        k: neighbour rank (the paper uses 5), smaller than ``N``.

    Returns:
        ``{"density": d, "coverage": c}``.

    Raises:
        ValueError: bad features or ``k``.

    Example:
        >>> real = np.array([[0.0], [1.0], [2.0], [3.0]])
        >>> density_coverage(real, np.array([[0.1], [0.2]]), k=1)
        {'density': 2.0, 'coverage': 0.5}
    """
    r, f = _pair(real, fake, min_rows=1)
    if r.shape[0] < 2:
        raise ValueError(f"`real` needs at least 2 rows, got {r.shape[0]}.")
    k = _check_k(k, r.shape[0], "real")
    return _Manifold(r, f).compute(np.ones(r.shape[0]), np.ones(f.shape[0]), k_pr=None, k_dc=k)


# ------------------------------------------------------------------------------ all at once
def _check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return QUALITY_METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)
    chosen = tuple(dict.fromkeys(metrics))
    unknown = [m for m in chosen if m not in QUALITY_METRICS]
    if unknown or not chosen:
        raise ValueError(
            f"`metrics` must be a non-empty subset of {QUALITY_METRICS}, got {metrics!r}."
        )
    return chosen


class _Evaluator:
    """Every requested metric for the full sets or a resample (rows weighted by counts)."""

    def __init__(
        self,
        r: np.ndarray,
        f: np.ndarray,
        metrics: tuple[str, ...],
        *,
        k_pr: int,
        k_dc: int,
        kid_subsets: int,
        kid_subset_size: int | None,
        seed: int,
    ) -> None:
        self.r, self.f, self.metrics = r, f, metrics
        self.k_pr, self.k_dc = k_pr, k_dc
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        want_pr = "precision" in metrics or "recall" in metrics
        want_dc = "density" in metrics or "coverage" in metrics
        self.manifold = _Manifold(r, f) if want_pr or want_dc else None
        self._k_pr = k_pr if want_pr else None
        self._k_dc = k_dc if want_dc else None
        self._kernels: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def full(self) -> dict[str, float]:
        r, f = self.r, self.f
        out: dict[str, float] = {}
        for name in self.metrics:
            if name == "fid":
                out["fid"] = fid(r, f)
            elif name == "kid":
                out["kid"], out["kid_std"] = kid(
                    r,
                    f,
                    subsets=self.kid_subsets,
                    subset_size=self.kid_subset_size,
                    seed=self.seed,
                )
            elif name == "cmmd":
                out["cmmd"] = cmmd(r, f)
        if self.manifold is not None:
            ones_r, ones_f = np.ones(r.shape[0]), np.ones(f.shape[0])
            pr = self.manifold.compute(ones_r, ones_f, k_pr=self._k_pr, k_dc=self._k_dc)
            out.update({k: v for k, v in pr.items() if k in self.metrics})
        return {k: out[k] for k in (*QUALITY_METRICS, "kid_std") if k in out}

    def _kernel(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if name not in self._kernels:
            r, f = self.r, self.f
            if name == "kid":
                g = 1.0 / r.shape[1]
                self._kernels[name] = tuple(  # type: ignore[assignment]
                    (a @ b.T * g + 1.0) ** 3 for a, b in ((r, r), (f, f), (r, f))
                )
            else:
                g = 1.0 / (2.0 * CMMD_SIGMA**2)
                self._kernels[name] = tuple(  # type: ignore[assignment]
                    _rbf_kernel(a, b, g) for a, b in ((r, r), (f, f), (r, f))
                )
        return self._kernels[name]

    def weighted(self, wr: np.ndarray, wf: np.ndarray) -> dict[str, float]:
        n, m = wr.sum(), wf.sum()
        out: dict[str, float] = {}
        for name in self.metrics:
            if name == "fid":
                out["fid"] = _fid_from_moments(*_moments(self.r, wr), *_moments(self.f, wf))
            elif name == "kid":  # unbiased MMD² over the whole resample, duplicates as drawn
                k_rr, k_ff, k_rf = self._kernel("kid")
                xx = (wr @ k_rr @ wr - wr @ np.diag(k_rr)) / (n * (n - 1))
                yy = (wf @ k_ff @ wf - wf @ np.diag(k_ff)) / (m * (m - 1))
                out["kid"] = float(xx + yy - 2.0 * (wr @ k_rf @ wf) / (n * m))
            elif name == "cmmd":
                k_rr, k_ff, k_rf = self._kernel("cmmd")
                v = wr @ k_rr @ wr / n**2 + wf @ k_ff @ wf / m**2 - 2.0 * (wr @ k_rf @ wf) / (n * m)
                out["cmmd"] = CMMD_SCALE * float(v)
        if self.manifold is not None:
            pr = self.manifold.compute(wr, wf, k_pr=self._k_pr, k_dc=self._k_dc)
            out.update({k: v for k, v in pr.items() if k in self.metrics})
        return out


def _evaluator(
    real: Any,
    fake: Any,
    metrics: Sequence[str] | None,
    k_pr: int,
    k_dc: int,
    kid_subsets: int,
    kid_subset_size: int | None,
    seed: int,
) -> _Evaluator:
    chosen = _check_metrics(metrics)
    r, f = _pair(real, fake)
    if "precision" in chosen or "recall" in chosen:
        _check_k(k_pr, min(r.shape[0], f.shape[0]), "real` / `fake")
    if "density" in chosen or "coverage" in chosen:
        _check_k(k_dc, r.shape[0], "real")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"`seed` must be an integer, got {seed!r}.")
    return _Evaluator(
        r,
        f,
        chosen,
        k_pr=int(k_pr),
        k_dc=int(k_dc),
        kid_subsets=_positive_int(kid_subsets, "kid_subsets"),
        kid_subset_size=kid_subset_size,
        seed=int(seed),
    )


def quality_metrics(
    real: Any,
    fake: Any,
    *,
    metrics: Sequence[str] | None = None,
    k_pr: int = 3,
    k_dc: int = 5,
    kid_subsets: int = 10,
    kid_subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Any of FID, KID, CMMD, precision, recall, density and coverage on one pair of sets.

    Args:
        real: ``(N, D)`` features of real images.
        fake: ``(M, D)`` features of generated images.
        metrics: names from :data:`QUALITY_METRICS` (default: all).
        k_pr: ``k`` of :func:`precision_recall`.
        k_dc: ``k`` of :func:`density_coverage`.
        kid_subsets: ``subsets`` of :func:`kid`.
        kid_subset_size: ``subset_size`` of :func:`kid`.
        seed: seed of KID's subsets.

    Returns:
        ``{name: value}`` in the order of :data:`QUALITY_METRICS`, plus ``"kid_std"`` with KID.

    Raises:
        ValueError: bad features, an unknown metric or bad options.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(60, 3))
        >>> sorted(quality_metrics(x, x + 0.1, metrics=("fid", "kid")))
        ['fid', 'kid', 'kid_std']
    """
    ev = _evaluator(real, fake, metrics, k_pr, k_dc, kid_subsets, kid_subset_size, seed)
    return ev.full()


def quality_bootstrap(
    real: Any,
    fake: Any,
    *,
    metrics: Sequence[str] | None = None,
    k_pr: int = 3,
    k_dc: int = 5,
    n_boot: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :func:`quality_metrics`, rows of each set resampled.

    Each resample draws ``N`` real rows and, independently, ``M`` fake rows with replacement
    (from ``np.random.default_rng(seed)``) and recomputes every metric with the rows weighted by
    how often they were drawn. Three details keep the resampled figures comparable to the
    point estimates:

    * KID in a resample is the unbiased MMD² over the whole resample (the expectation of
      :func:`kid`'s subset average, without its subset noise);
    * the k-NN balls of precision / recall / density / coverage are built from the *distinct*
      rows drawn, so a row drawn twice is not its own nearest neighbour (which would shrink
      every ball to a point) nor two balls (which would inflate density by about 1 / 0.632);
    * distances and kernel matrices are computed once (memory ``O((N + M)^2)``).

    The intervals cover the sampling noise of *both* sets; FID's small-sample bias is not
    corrected (see :func:`quality_vs_sample_size`).

    Args:
        real: ``(N, D)`` features.
        fake: ``(M, D)`` features.
        metrics: names from :data:`QUALITY_METRICS` (default: all).
        k_pr: ``k`` of :func:`precision_recall`.
        k_dc: ``k`` of :func:`density_coverage`.
        n_boot: number of resamples.
        level: confidence level in ``(0, 1)``.
        seed: seed of the resamples.

    Returns:
        ``{name: (low, high)}`` for each requested metric.

    Raises:
        ValueError: bad features, metrics or options.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> real, fake = rng.normal(size=(80, 2)), rng.normal(size=(80, 2))
        >>> lo, hi = quality_bootstrap(real, fake, metrics=("fid",), n_boot=50)["fid"]
        >>> bool(0.0 <= lo <= fid(real, fake) <= hi)
        True
    """
    _check_options(n_boot, level, seed)
    ev = _evaluator(real, fake, metrics, k_pr, k_dc, 1, None, seed)
    n, m = ev.r.shape[0], ev.f.shape[0]
    rng = np.random.default_rng(int(seed))
    per: dict[str, list[float]] = {name: [] for name in ev.metrics}
    for _ in range(int(n_boot)):
        wr = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        wf = np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64)
        for name, value in ev.weighted(wr, wf).items():
            per[name].append(value)
    return {name: _percentile_interval(np.asarray(v), level) for name, v in per.items()}


def quality_vs_sample_size(
    real: Any,
    fake: Any,
    *,
    sizes: Sequence[int] | None = None,
    repeats: int = 3,
    metrics: Sequence[str] | None = None,
    k_pr: int = 3,
    k_dc: int = 5,
    kid_subsets: int = 10,
    seed: int = 0,
) -> list[dict[str, float]]:
    """The metrics on random subsamples of ``n`` rows of each set, for several ``n``.

    FID is biased upwards at small ``n`` (its bias shrinks like ``1 / n``), KID is unbiased,
    and precision / recall / density / coverage drift with ``n`` because the k-NN balls shrink
    as samples get denser: a card shows these rows so figures are only compared at equal ``n``.
    Each ``n`` draws ``repeats`` subsamples of both sets without replacement (the full sets,
    once, at ``n = min(N, M)``).

    Args:
        real: ``(N, D)`` features.
        fake: ``(M, D)`` features.
        sizes: subsample sizes; default ``min(N, M) // 8, // 4, // 2`` and ``min(N, M)``, keeping
            those large enough for the requested metrics (at least 2, and above ``k``).
        repeats: subsamples per size (their mean and std are reported).
        metrics: names from :data:`QUALITY_METRICS` (default: all).
        k_pr: ``k`` of :func:`precision_recall`.
        k_dc: ``k`` of :func:`density_coverage`.
        kid_subsets: ``subsets`` of :func:`kid` (with ``subset_size = n``).
        seed: seed of the subsamples and of KID's subsets.

    Returns:
        One dict per size, ascending: ``{"n": n, name: mean, name + "_std": std, ...}``.

    Raises:
        ValueError: bad features, metrics or sizes.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> real, fake = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
        >>> rows = quality_vs_sample_size(real, fake, metrics=("fid",))
        >>> [r["n"] for r in rows], rows[0]["fid"] > rows[-1]["fid"]
        ([50, 100, 200, 400], True)
    """
    chosen = _check_metrics(metrics)
    r, f = _pair(real, fake)
    reps = _positive_int(repeats, "repeats")
    n_max = min(r.shape[0], f.shape[0])
    need = 2
    if "precision" in chosen or "recall" in chosen:
        need = max(need, _positive_int(k_pr, "k_pr") + 1)
    if "density" in chosen or "coverage" in chosen:
        need = max(need, _positive_int(k_dc, "k_dc") + 1)
    if sizes is None:
        candidates = [n_max // 8, n_max // 4, n_max // 2, n_max]
        chosen_sizes = sorted({n for n in candidates if n >= need})
    else:
        chosen_sizes = sorted({_positive_int(n, "sizes") for n in sizes})
        bad = [n for n in chosen_sizes if not need <= n <= n_max]
        if bad:
            raise ValueError(
                f"`sizes` must lie in [{need}, min(N_real, N_fake) = {n_max}], got {bad}."
            )
    if not chosen_sizes:
        raise ValueError(f"Too few rows ({n_max}) for any subsample of at least {need} rows.")
    rng = np.random.default_rng(int(seed))
    rows = []
    for n in chosen_sizes:
        full = n == r.shape[0] == f.shape[0]
        values: dict[str, list[float]] = {}
        for rep in range(1 if full else reps):
            ri = np.sort(rng.choice(r.shape[0], n, replace=False))
            fi = np.sort(rng.choice(f.shape[0], n, replace=False))
            out = quality_metrics(
                r[ri],
                f[fi],
                metrics=chosen,
                k_pr=k_pr,
                k_dc=k_dc,
                kid_subsets=kid_subsets,
                kid_subset_size=n,
                seed=int(seed) + rep,
            )
            out.pop("kid_std", None)
            for name, v in out.items():
                values.setdefault(name, []).append(v)
        row: dict[str, float] = {"n": n}
        for name, v in values.items():
            row[name] = float(np.mean(v))
            row[f"{name}_std"] = float(np.std(v)) if len(v) > 1 else math.nan
        rows.append(row)
    return rows
