"""A PNG of a boolean picture, written with zlib alone (``Mask.draw(path=...)``)."""

from __future__ import annotations

import struct
import zlib

import torch


def write_png(path: str, dense: torch.Tensor, cell: int = 8) -> None:
    """Write bool (rows, cols) ``dense`` as a grayscale PNG: white where True, ``cell`` pixels a square."""
    img = dense.to(torch.uint8).mul(255).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    rows, cols = img.shape
    raw = b"".join(b"\x00" + bytes(r) for r in img.tolist())

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    with open(path, "wb") as f:
        f.write(png)
