"""The step loop when a step fails: every live request ends with a fixed message, the traceback is logged."""

from __future__ import annotations

import logging

from runtime.lm_service.engine_loop import STEP_FAILED, EngineLoop, error_output


class BrokenEngine:
    """Just enough of an Engine for the loop: its first step raises."""

    def __init__(self):
        self.steps_run = 0
        self.states = {"a": object(), "b": object()}
        self.failed_with: str | None = None

    def stats(self):
        return None

    def step(self):
        raise RuntimeError("secret internal detail")

    def fail_all(self, message: str):
        self.failed_with = message
        return [error_output(rid, message) for rid in self.states]

    def has_unfinished(self) -> bool:
        return True


def test_a_failed_step_fails_every_request_without_its_text_and_logs_the_traceback(caplog) -> None:
    engine, delivered = BrokenEngine(), []
    loop = EngineLoop(engine, delivered.extend)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="runtime"):
        loop.run()  # returns: the engine is broken
    assert isinstance(loop.error, RuntimeError)
    assert [o.request_id for o in delivered] == ["a", "b"]
    assert all(o.error == STEP_FAILED and o.error_type == "internal" for o in delivered)
    assert "secret" not in STEP_FAILED
    record, = caplog.records
    assert record.exc_info is not None and "2 live requests" in record.getMessage()
    assert "secret internal detail" in caplog.text
