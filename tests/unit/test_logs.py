"""The runtime's log lines reach Serve's handlers in a replica, at the app's level, once each."""

from __future__ import annotations

import logging

import pytest

from runtime import logs


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def loggers():
    """The "runtime" and "ray.serve" loggers as they were, after the test (caplog needs propagation)."""
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate)
             for lg in (logging.getLogger(logs.PACKAGE), logging.getLogger(logs.SERVE_LOGGER))]
    yield
    for lg, level, handlers, propagate in saved:
        lg.setLevel(level)
        lg.handlers = handlers
        lg.propagate = propagate


def test_a_replica_writes_runtime_lines_through_serves_handlers_at_the_apps_level(loggers) -> None:
    serve_logger = logging.getLogger(logs.SERVE_LOGGER)
    first, second = Capture(), Capture()
    serve_logger.handlers = [first]
    logs.to_serve("WARNING")
    logs.to_serve("INFO")  # configured again (a replica restarted in the same worker): no second copy
    serve_logger.handlers = [second]  # Serve rebuilt its handlers (a new logging config)
    module = logging.getLogger("runtime.lm_service.deployment")
    module.info("%s: admitted", "req-1")
    module.debug("%s: below the level", "req-1")
    assert first.records == []
    assert [r.getMessage() for r in second.records] == ["req-1: admitted"]
    assert second.records[0].name == "runtime.lm_service.deployment"
    assert logs.level() == logging.INFO


def test_another_process_writes_to_stderr(loggers, capsys) -> None:
    logs.to_stderr("DEBUG")
    logging.getLogger("runtime.lm_service.engine_core").debug("%s: step", "core")
    err = capsys.readouterr().err
    assert "DEBUG" in err and "runtime.lm_service.engine_core: core: step" in err
