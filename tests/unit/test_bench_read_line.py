"""bench/datapath.py's line reader: a line is returned only once its newline has
arrived, however many reads it takes, and nothing read past it is lost."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

from bench.datapath import read_line


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    with contextlib.suppress(OSError):  # the end-of-file test closed it already
        os.close(w)


def _write_in_pieces(fd: int, data: bytes, piece: int, pause: float) -> threading.Thread:
    def run() -> None:
        for i in range(0, len(data), piece):
            os.write(fd, data[i:i + piece])
            time.sleep(pause)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_long_line_in_pieces_is_returned_whole(pipe: tuple[int, int]) -> None:
    r, w = pipe
    record = json.dumps({"us": [float(i) for i in range(3000)]})
    assert len(record) > 3 * 4096
    data = b"listening\n" + record.encode() + b"\nafter\n"
    writer = _write_in_pieces(w, data, 1000, 0.005)
    pending = bytearray()
    assert read_line(r, "listening", 5, pending) == "listening"
    line = read_line(r, "{", 5, pending)
    writer.join()
    assert line is not None
    assert json.loads(line)["us"][-1] == 2999.0
    assert read_line(r, "after", 1, pending) == "after"
    assert pending == b""


def test_lines_read_together_are_kept_for_the_next_call(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"noise\nlistening\n{\"a\": 1}\n")
    pending = bytearray()
    assert read_line(r, "listening", 1, pending) == "listening"
    assert read_line(r, "{", 1, pending) == '{"a": 1}'


def test_half_a_line_is_not_a_line(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b'{"us": [1.0, 2.')
    pending = bytearray()
    assert read_line(r, "{", 0.3, pending) is None
    os.write(w, b'0]}\n')
    assert read_line(r, "{", 1, pending) == '{"us": [1.0, 2.0]}'


def test_last_line_cut_by_end_of_file_counts(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.write(w, b"skip\nready")
    os.close(w)
    pending = bytearray()
    assert read_line(r, "ready", 1, pending) == "ready"
    assert read_line(r, "ready", 1, pending) is None
