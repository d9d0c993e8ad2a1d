"""keep_freed_memory sets glibc's two thresholds, and is a no-op where there is no mallopt.

What it buys (fewer page faults, a cheaper prefill) is measured in bench/README.md, not timed here."""

from __future__ import annotations

import sys

import pytest

from runtime.lm_service import allocator


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_both_thresholds_are_set_mmap_first(monkeypatch) -> None:
    libc = _Libc()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert allocator.keep_freed_memory()
    # M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1 (glibc's malloc.h)
    assert libc.calls == [(-3, 16 * 2**20), (-1, 64 * 2**20)]


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())
    assert allocator.keep_freed_memory() is False


def test_a_refused_threshold_is_reported(monkeypatch) -> None:
    class Refusing(_Libc):
        def mallopt(self, param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Refusing())
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_this_machines_glibc_takes_them() -> None:
    assert allocator.keep_freed_memory()
