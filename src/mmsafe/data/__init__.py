"""Data: the shared ``Dataset``, manifest loading and validation, and built-in worlds."""

from mmsafe.data.dataset import UNLABELLED, Dataset, SkippedRow
from mmsafe.data.manifest import ManifestError, Problem, load_manifest, write_manifest

__all__ = [
    "UNLABELLED",
    "Dataset",
    "ManifestError",
    "Problem",
    "SkippedRow",
    "load_manifest",
    "write_manifest",
]
