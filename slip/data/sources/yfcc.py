"""YFCC15M in SLIP's layout: a trusted pickle of (image_id, title, description) and images in zip archives."""
from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from slip.data.decode import DEFAULT_MAX_PIXELS, BadSample, check_captions, decode_image
from slip.data.sources.base import PackedRecords, check_index

__all__ = ["YFCC15MSource"]


class _ZipReader:
    """Reads members of zip archives, keeping the most recently used archives open in this process only.

    Zip handles must not cross a fork (parent and child would share the file offset), so the cache is
    reset whenever the process id changes, and left out when pickled.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._pid: int | None = None
        self._open: OrderedDict[str, zipfile.ZipFile] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "_pid": None, "_open": OrderedDict()}

    def _archive(self, path: str) -> zipfile.ZipFile:
        if self._pid != os.getpid():
            for inherited in self._open.values():
                inherited.close()  # closes only this process's copy of the descriptor
            self._pid, self._open = os.getpid(), OrderedDict()
        archive = self._open.get(path)
        if archive is not None:
            self._open.move_to_end(path)
            return archive
        try:
            archive = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise BadSample("missing", path) from None
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise BadSample("corrupt", path, f"{type(error).__name__}: {error}") from None
        self._open[path] = archive
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
        return archive

    def read(self, path: str, member: str) -> bytes:
        """The bytes of `member` in the archive at `path`; raises BadSample."""
        archive = self._archive(path)
        try:
            return archive.read(member)
        except KeyError:
            raise BadSample("missing", f"{path}:{member}") from None
        # A damaged archive can fail in zlib, zipfile or the OS; each means this member is unusable.
        except Exception as error:  # noqa: BLE001
            raise BadSample("corrupt", f"{path}:{member}", f"{type(error).__name__}: {error}") from None


class YFCC15MSource:
    """YFCC15M in SLIP's layout: the ``yfcc15m.pkl`` made by SLIP's ``make_dataset.py`` and zipped images.

    The pickle holds a list of ``(image_id: int, title: str, description: str)``. Image ``12345678`` is member
    ``678.jpg`` of ``{zip_root}/12/345.zip`` (the id zero-padded to 8 digits, split 2 + 3 + rest), where
    ``zip_root`` is the ``images/`` directory of SLIP's ``yfcc100m/`` tree; override `locate` for another
    naming. Captions are the non-blank ones of title and description; one is drawn per step. The pickle can
    run code when loaded: use only metadata you trust.
    """

    def __init__(self, metadata_pickle: str, zip_root: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        path = os.fspath(metadata_pickle)
        try:
            with open(path, "rb") as file:
                samples = pickle.load(file)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such metadata file") from None
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as error:
            raise ValueError(f"{path}: not a readable pickle: {error}") from None

        def records() -> Iterator[tuple[Any, ...]]:
            for i, sample in enumerate(samples):
                triple = isinstance(sample, Sequence) and len(sample) == 3
                if not (triple and isinstance(sample[0], (int, np.integer))):
                    raise ValueError(f"{path}: record {i} is not an (image_id: int, title, description)")
                yield str(sample[0]), sample[1], sample[2]

        self._records, self._name = PackedRecords(records()), path
        self.zip_root, self.max_pixels = os.fspath(zip_root), max_pixels
        self._zips = _ZipReader()

    @staticmethod
    def locate(image_id: int) -> tuple[str, str]:
        """(zip path relative to `zip_root`, member) of an image: 12345678 -> ("12/345.zip", "678.jpg")."""
        if not 0 <= image_id < 10**8:
            raise BadSample("bad_record", f"image_id {image_id}", "SLIP's layout needs 0 <= image_id < 10**8")
        digits = f"{image_id:08d}"
        return f"{digits[:2]}/{digits[2:5]}.zip", f"{digits[5:]}.jpg"

    def __len__(self) -> int:
        """Number of records."""
        return len(self._records)

    def load(self, index: int) -> tuple[Image.Image, list[str]]:
        """The image and non-blank ones of (title, description) of record `index`; raises BadSample."""
        index = check_index(index, len(self), self)
        image_id, title, description = self._records[index]
        captions = check_captions((title, description), f"{self._name}[{index}]")
        archive, member = self.locate(int(image_id))
        archive = os.path.join(self.zip_root, archive)
        image = decode_image(self._zips.read(archive, member), f"{archive}:{member}", self.max_pixels)
        return image, captions
