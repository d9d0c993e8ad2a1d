"""Where the runtime's log lines go, and at which level.

Every module logs through its own logger (`log = logging.getLogger(__name__)`), so all of them sit
below the "runtime" logger, and each process configures that one logger once, at start, with the
app's `log_level` (AppConfig.log_level, from the YAML):

- A Serve replica (`to_serve`): Serve sets up only its own "ray.serve" logger (the replica's log
  file, stderr too under RAY_SERVE_LOG_TO_STDERR, each line naming the replica and the Serve
  request), and a Ray worker's root logger has no handler: a record of ours would be lost below
  WARNING. So "runtime" records go to the handlers "ray.serve" has when they come (Serve may
  rebuild them), and stop there, so that none is written twice.
- Any other process (the engine-core process, the CLI): `to_stderr`, which Ray keeps in the
  worker's log for a process a replica started.

A line about a request starts with its id (`log.info("%s: finished ...", request_id)`), so one grep
finds the request's story in the router's, the LM replica's and the vision replica's logs. The
per-token path logs nothing above DEBUG.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
PACKAGE = "runtime"
SERVE_LOGGER = "ray.serve"
_FORMAT = "%(levelname)s %(asctime)s %(processName)s %(process)d %(name)s: %(message)s"


class _ToServe(logging.Handler):
    """Hands each record to the "ray.serve" logger's handlers, as they are at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).callHandlers(record)


def to_serve(level: LogLevel | int) -> None:
    """In a Serve replica's constructor: the runtime's lines join the replica's own log."""
    _configure(level, _ToServe())


def to_stderr(level: LogLevel | int) -> None:
    """In a process that is no Serve replica."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FORMAT))
    _configure(level, handler)


def level() -> int:
    """This process's level, for a process it starts (the engine core logs at its replica's level)."""
    return logging.getLogger(PACKAGE).getEffectiveLevel()


def _configure(level: LogLevel | int, handler: logging.Handler) -> None:
    logger = logging.getLogger(PACKAGE)
    logger.setLevel(level)
    logger.handlers = [handler]  # replaced, not added: configuring twice writes each line once
    logger.propagate = False
