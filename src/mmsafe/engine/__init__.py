"""The engine: batched forward passes, device and seeds, and the output cache."""

from mmsafe.engine.cache import (
    TensorCache,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    default_cache_dir,
    stable_hash,
)
from mmsafe.engine.runner import DeviceError, Engine, resolve_device, set_seed
from mmsafe.engine.variants import Variant, corruption_variant

__all__ = [
    "DeviceError",
    "Engine",
    "TensorCache",
    "Variant",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "corruption_variant",
    "default_cache_dir",
    "resolve_device",
    "set_seed",
    "stable_hash",
]
