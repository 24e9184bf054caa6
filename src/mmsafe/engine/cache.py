"""An on-disk cache of tensors and JSON with atomic writes.

Every write goes to a temporary file in the same folder and is moved into place with
``os.replace``, so a crash or Ctrl-C never leaves a half-written entry: a reader sees either the
old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def default_cache_dir() -> Path:
    """``$MMSAFE_CACHE_DIR``, else the user cache dir (XDG on Linux) ``.../mmsafe``."""
    env = os.environ.get("MMSAFE_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mmsafe"))


def stable_hash(*parts: Any) -> str:
    """A short sha256 of the JSON encoding of ``parts`` (keys sorted).

    Example:
        >>> stable_hash({"b": 1, "a": 2}) == stable_hash({"a": 2, "b": 1})
        True
    """
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place.

    ``durable=False`` skips the fsync: the rename is still atomic (a reader sees the old file or
    the new one), but a power cut may leave an empty file. Right for caches, where a bad entry is
    a miss, and wrong for results.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as fh:  # reach the disk before the rename makes it visible
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Path, text: str, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text, durable)


class TensorCache:
    """Named groups of tensors stored as safetensors files under one folder.

    Entries are also kept in memory: all of them without a folder; with one, the most recently
    used up to ``memory_bytes`` (the rest are read back from disk when asked for), so the
    shards of a million-row audit do not all stay resident.

    Args:
        root: the folder; ``None`` keeps everything in memory only.
        memory_bytes: the in-memory budget of a rooted cache.

    Example:
        >>> import torch
        >>> c = TensorCache(None)
        >>> c.put("k", {"x": torch.ones(2)})
        >>> c.get("k")["x"].tolist()
        [1.0, 1.0]
    """

    def __init__(self, root: Path | None, memory_bytes: int = 1 << 30) -> None:
        self.root = None if root is None else Path(root)
        self.memory_bytes = int(memory_bytes)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}  # in least-recently-used order
        self._held = 0

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{key}.safetensors"

    def get(self, key: str, fresh: bool = False) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or ``None``.

        ``fresh``: read the disk even when memory holds the key (another process, e.g. a
        backend's worker, may have written a newer entry).
        """
        if fresh and self.root is not None and key in self._memory:
            self._held -= _nbytes(self._memory.pop(key))
        if key in self._memory:
            tensors = self._memory.pop(key)
            self._memory[key] = tensors  # most recently used last
            return tensors
        if self.root is not None and self._path(key).exists():
            try:
                tensors = load_file(str(self._path(key)))
            except Exception:  # a corrupt entry is a miss, never a crash
                return None
            self._hold(key, tensors)
            return tensors
        return None

    def _hold(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        old = self._memory.pop(key, None)
        if old is not None:
            self._held -= _nbytes(old)
        self._memory[key] = tensors
        self._held += _nbytes(tensors)
        if self.root is None:
            return
        while self._held > self.memory_bytes and len(self._memory) > 1:
            oldest = next(iter(self._memory))  # on disk already: dropping it loses nothing
            self._held -= _nbytes(self._memory.pop(oldest))

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` under ``key`` (in memory and, when rooted, on disk atomically)."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.root is not None:  # on disk before it can be dropped from memory
            atomic_write(self._path(key), lambda tmp: save_file(tensors, str(tmp)))
        self._hold(key, tensors)


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
