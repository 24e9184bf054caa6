"""Lazy modality columns: values that are produced when a batch asks for them.

A :class:`~mmsafe.data.Dataset` column is any sequence. An in-memory list holds decoded values;
a :class:`LazyColumn` holds only what it needs to produce them (file paths, a world's drawn
attributes), so a manifest of ``N`` images costs ``O(N)`` small metadata and the images are
decoded inside the engine's batches (:meth:`LazyColumn.load`), in DataLoader worker processes.

Every lazy column is a read-only ``Sequence``: ``column[i]`` and iteration decode on access, so
code written for lists keeps working; ``take(rows)`` is a view (nothing decoded), and ``digest()``
identifies the content without decoding it (a data fingerprint of a lazy dataset costs no pixels).

Example:
    >>> col = Computed(5, lambda rows: [int(r) * 10 for r in rows], b"times ten")
    >>> col[3], col[-1], list(col.take([4, 0]))
    (30, 40, [40, 0])
    >>> col.take([4, 0]).digest() != col.digest()
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image, ImageOps

__all__ = ["Computed", "ImageFiles", "LazyColumn", "decode_image", "file_digest", "is_lazy"]


class LazyColumn(Sequence[Any]):
    """A read-only column whose values are produced on access.

    Subclasses implement :meth:`_load_base` (values at positions of the *base* column) and
    :meth:`_base_digest`; this class handles views (``take``), indexing and digests.

    Args:
        n_base: the number of rows of the base column.
        rows: the base positions this view shows (``None``: every row, in order).
    """

    def __init__(self, n_base: int, rows: np.ndarray | None = None) -> None:
        self._n_base = int(n_base)
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    # -- what a subclass provides -----------------------------------------------------------
    def _load_base(self, base_rows: np.ndarray) -> list[Any]:
        raise NotImplementedError

    def _base_digest(self) -> bytes:
        raise NotImplementedError

    def _view(self, rows: np.ndarray) -> LazyColumn:
        """A copy of this column showing base positions ``rows``."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out._rows = rows
        return out

    # -- the Sequence protocol ----------------------------------------------------------------
    def __len__(self) -> int:
        return self._n_base if self._rows is None else len(self._rows)

    def base_rows(self, positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """The base positions of this view's ``positions`` (all of them for ``None``)."""
        pos = np.arange(len(self)) if positions is None else np.asarray(positions, np.int64)
        pos = pos.reshape(-1)
        if pos.size and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"row out of range for a column of {len(self)} rows")
        pos = np.where(pos < 0, pos + len(self), pos)
        return pos if self._rows is None else self._rows[pos]

    def load(self, positions: Sequence[int] | np.ndarray) -> list[Any]:
        """The values at ``positions`` of this view, produced in one call (a batch)."""
        return self._load_base(self.base_rows(positions))

    def prepare(self) -> None:
        """Do once, in this process, the set-up every batch of this view would repeat.

        The engine calls it before forking DataLoader workers, so they inherit the work instead
        of each doing it (e.g. a world's walk through its pixel-noise stream). A no-op here.
        """

    def take(self, positions: Sequence[int] | np.ndarray) -> LazyColumn:
        """A view of the rows at ``positions``; nothing is decoded."""
        return self._view(self.base_rows(positions))

    @overload
    def __getitem__(self, key: int) -> Any: ...
    @overload
    def __getitem__(self, key: slice) -> list[Any]: ...
    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return self.load(np.arange(len(self))[key])
        return self.load([int(key)])[0]

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self), 256):  # decode in batches, not the whole column
            yield from self.load(np.arange(start, min(start + 256, len(self))))

    def digest(self) -> bytes:
        """A content digest of the rows this view shows, computed without decoding them."""
        h = hashlib.blake2b(self._base_digest(), digest_size=16)
        if self._rows is not None:
            h.update(b"rows\x1f" + self._rows.tobytes())
        return h.digest()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} rows>"


def is_lazy(values: Any) -> bool:
    """Whether a column produces its values on access."""
    return isinstance(values, LazyColumn)


class Computed(LazyColumn):
    """A column computed by ``fn(base_rows) -> values``, identified by ``key`` (tests, worlds)."""

    def __init__(self, n: int, fn: Callable[[np.ndarray], list[Any]], key: bytes) -> None:
        super().__init__(n)
        self._fn, self._key = fn, bytes(key)

    def _load_base(self, base_rows: np.ndarray) -> list[Any]:
        return list(self._fn(base_rows))

    def _base_digest(self) -> bytes:
        return self._key


def decode_image(path: str | Path) -> np.ndarray:
    """An image file as an RGB ``uint8`` array ``(H, W, 3)``, EXIF orientation applied.

    Raises PIL's errors (``UnidentifiedImageError``, ``OSError``...) for a file it cannot read,
    and ``Image.DecompressionBombError`` for an image of more than ``Image.MAX_IMAGE_PIXELS``
    pixels (PIL itself only warns up to twice that, after which decoding would allocate
    gigabytes), before any pixel is decoded.
    """
    with Image.open(path) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and im.width * im.height > limit:
            raise Image.DecompressionBombError(
                f"image of {im.width}x{im.height} = {im.width * im.height} pixels, over the "
                f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?); "
                "downscale it"
            )
        return np.array(ImageOps.exif_transpose(im).convert("RGB"), dtype=np.uint8)


def file_digest(path: str | Path) -> bytes:
    """A 16-byte BLAKE2b digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.digest()


class ImageFiles(LazyColumn):
    """Images kept as file paths with their content digests, decoded in batches on access.

    Args:
        paths: absolute paths, one per row.
        digests: ``(N, 16)`` ``uint8`` file digests (:func:`file_digest`), taken when the
            manifest was validated: the column's digest, hence the data fingerprint, follows the
            files' bytes, and a file changed after loading gives a different fingerprint on the
            next load.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp(); p = os.path.join(d, "a.png")
        >>> Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(p)
        >>> col = ImageFiles([p], np.frombuffer(file_digest(p), np.uint8)[None])
        >>> col[0].shape
        (4, 6, 3)
    """

    def __init__(self, paths: Sequence[str], digests: np.ndarray) -> None:
        super().__init__(len(paths))
        self._paths = list(paths)
        self._digests = np.asarray(digests, dtype=np.uint8).reshape(len(self._paths), 16)

    def _load_base(self, base_rows: np.ndarray) -> list[Any]:
        return [decode_image(self._paths[int(i)]) for i in base_rows]

    def _base_digest(self) -> bytes:
        return hashlib.blake2b(self._digests.tobytes(), digest_size=16).digest()

    def paths(self) -> list[str]:
        """The file path of each row of this view."""
        return [self._paths[int(i)] for i in self.base_rows()]
