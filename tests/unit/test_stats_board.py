"""The stats board's lifetime rule: it ends once Serve no longer has its app, and only then."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import ray
from ray import serve

from runtime.stats_board import StatsBoard, app_running, wait_for_app_end


def test_waits_while_the_app_runs_or_serve_cannot_say() -> None:
    answers = iter([True, None, True, None, False])
    asked: list[str] = []

    def running(app: str) -> bool | None:
        asked.append(app)
        return next(answers)

    wait_for_app_end("kimi", running, period_s=0)
    assert asked == ["kimi"] * 5


@pytest.mark.parametrize(("status", "expected"), [
    (lambda: SimpleNamespace(applications={"kimi": object()}), True),
    (lambda: SimpleNamespace(applications={"other": object()}), False),  # deleted, or a config without it
    (lambda: SimpleNamespace(applications={}), False),  # Serve not running
])
def test_app_running_reads_serves_applications(monkeypatch, status, expected) -> None:
    monkeypatch.setattr(serve, "status", status)
    assert app_running("kimi") is expected


def _raise(error: Exception):
    def status():
        raise error
    return status


def test_a_controller_shut_down_for_good_means_the_app_is_gone(monkeypatch) -> None:
    monkeypatch.setattr(serve, "status", _raise(ray.exceptions.ActorDiedError()))
    assert app_running("kimi") is False


def test_a_controller_that_cannot_answer_now_is_no_verdict(monkeypatch) -> None:
    monkeypatch.setattr(serve, "status", _raise(ray.exceptions.GetTimeoutError("busy")))
    assert app_running("kimi") is None


def test_a_board_of_no_app_watches_nothing() -> None:
    board = StatsBoard()
    board.report("lm", "r1", {"running": 1})
    assert board.snapshot() == {"lm": {"r1": {"running": 1}}}
    assert not [t for t in threading.enumerate() if t.name == "end-with-app"]
