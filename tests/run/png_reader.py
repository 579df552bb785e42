"""A minimal PNG decoder written from the PNG specification (RFC 2083), independent of the libraries
that write our plots: chunk CRCs checked, IDAT inflated with zlib, the five scanline filters
undone; 8-bit RGB and RGBA only (what matplotlib's Agg canvas writes)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """(pixels [H, W, channels] uint8, the tEXt chunks as {key: text})."""
    raw = Path(path).read_bytes()
    assert raw[:8] == SIGNATURE, "not a PNG file"
    pos, idat, text = 8, b"", {}
    width = height = channels = None
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        data = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + data) == crc, f"bad CRC in chunk {kind!r}"
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += data
        elif kind == b"tEXt":
            key, value = data.split(b"\x00", 1)
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IEND":
            break
    assert width and height and channels
    stride = width * channels
    flat = zlib.decompress(idat)
    assert len(flat) == height * (stride + 1)
    out = np.zeros((height, stride), np.int64)
    prev = np.zeros(stride, np.int64)
    for y in range(height):
        ftype = flat[y * (stride + 1)]
        line = np.frombuffer(flat, np.uint8, stride, y * (stride + 1) + 1).astype(np.int64)
        cur = np.zeros(stride, np.int64)
        for i in range(stride):
            a = cur[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if ftype == 0:
                pred = 0
            elif ftype == 1:
                pred = a
            elif ftype == 2:
                pred = b
            elif ftype == 3:
                pred = (a + b) // 2
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            else:
                raise AssertionError(f"unknown filter type {ftype}")
            cur[i] = (line[i] + pred) & 0xFF
        out[y] = cur
        prev = cur
    return out.reshape(height, width, channels).astype(np.uint8), text
