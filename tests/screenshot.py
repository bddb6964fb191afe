"""Screenshots of an X display for desktop-viewer tests: ``xwd`` output read without extra tools."""

from __future__ import annotations

import struct
import subprocess


def grab(display: str, timeout: float = 30) -> tuple[int, int, list[bytes]]:
    """The root window of ``display``: width, height and rows of 32-bit BGRX pixels."""
    data = subprocess.run(["xwd", "-root", "-silent", "-display", display], capture_output=True,
                          check=True, timeout=timeout).stdout
    fields = struct.unpack(">25I", data[:100])
    header_size, width, height, bits_per_pixel, bytes_per_line, colours = (
        fields[0], fields[4], fields[5], fields[11], fields[12], fields[19])
    if bits_per_pixel != 32:
        raise AssertionError(f"expected a 24-bit display in 32-bit pixels, got {bits_per_pixel}")
    start = header_size + colours * 12
    return width, height, [data[start + y * bytes_per_line: start + y * bytes_per_line + 4 * width]
                           for y in range(height)]


def box_of(rows: list[bytes], bgr: tuple[int, int, int]) -> tuple[int, int, int, int] | None:
    """The bounding box (x0, y0, x1, y1) of the pixels of one colour, or None."""
    wanted = bytes(bgr)
    xs: list[int] = []
    ys: list[int] = []
    for y, row in enumerate(rows):
        for x in range(len(row) // 4):
            if row[4 * x:4 * x + 3] == wanted:
                xs.append(x)
                ys.append(y)
    return (min(xs), min(ys), max(xs), max(ys)) if xs else None


def mid_grey_share(rows: list[bytes], box: tuple[int, int, int, int]) -> float:
    """The share of pixels inside ``box`` that are mid greys (40..215): an image, not black
    background and white overlay text."""
    x0, y0, x1, y1 = box
    count = 0
    for y in range(y0, y1):
        row = rows[y]
        for x in range(x0, x1):
            b, g, r = row[4 * x:4 * x + 3]
            count += r == g == b and 40 <= r <= 215
    return count / max((x1 - x0) * (y1 - y0), 1)
