"""Tiny generated inputs for the data tests: encoded images, tar shards, and a small random transform."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CAPTION_LENGTH = 48


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6), fmt: str = "PNG"
) -> bytes:
    """An encoded solid-colour RGB image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> Path:
    """Write a small solid-colour image to `path` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(color, fmt=fmt))
    return path


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write an uncompressed tar with the given (name, data) members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, keys: list[str], color: tuple[int, int, int] = (10, 120, 240)) -> Path:
    """A WebDataset shard whose sample `key` has a PNG and the caption "caption of {key}"."""
    members = []
    for key in keys:
        members += [(f"{key}.png", image_bytes(color)), (f"{key}.txt", f"caption of {key}".encode())]
    return write_tar(path, members)


def caption_tensor(caption: str) -> torch.Tensor:
    """The caption's UTF-8 bytes as a fixed-length LongTensor (zero-padded), so tests can read it back."""
    data = list(caption.encode("utf-8"))[:CAPTION_LENGTH]
    return torch.tensor(data + [0] * (CAPTION_LENGTH - len(data)), dtype=torch.long)


def caption_of(tensor: torch.Tensor) -> str:
    """Inverse of `caption_tensor`."""
    return bytes(value for value in tensor.tolist() if value).decode("utf-8")


def tiny_transform(image: Image.Image, caption: str) -> dict[str, torch.Tensor]:
    """A random "augmentation": the 4x4 mean colour plus torch noise, and the caption as bytes."""
    pixels = torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1) / 255
    return {
        "image": pixels + 0.01 * torch.rand(3, 4, 4),
        "text": caption_tensor(caption),
        "aug1": torch.rand(2),
    }
