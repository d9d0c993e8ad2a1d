"""The step loop of one engine: steps on one thread, applies other threads' commands between steps.

The engine itself is single-threaded. Other threads (an event loop, a socket reader, the embedding
inbox) never wait for a step: they queue commands (add a request, embeddings, abort, fail, ask what
is missing), which the loop applies before its next step. What a step produced goes to `deliver`;
a stats snapshot goes to `on_stats` every `stats_period_s`.
The loop runs on its own thread (`start`) in an LM replica, or in the foreground (`run`) in an
engine-core process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch

from runtime.errors import RequestError
from runtime.lm_service.engine import Engine, EngineStats
from runtime.lm_service.request_state import EngineRequest
from runtime.protocol import EncodeError, ErrorKind, RequestOutput

log = logging.getLogger(__name__)

Deliver = Callable[[list[RequestOutput]], None]
# What a request hears when the step loop broke under it: the traceback is in this process's log.
STEP_FAILED = "the engine step failed; the LM replica's log has the details"


def error_output(request_id: str, message: str, error_type: ErrorKind = ErrorKind.INTERNAL) -> RequestOutput:
    """The last output of a request that ended with an error."""
    return RequestOutput(request_id, [], "", True, "error", message, error_type=error_type)


def encode_failure(error: EncodeError) -> tuple[str, ErrorKind]:
    """How an image that failed to encode fails its request: (message, error kind)."""
    return f"image {error.image_index}: {error.message}", ErrorKind(error.error_type).of_request()


class EngineDeadError(RuntimeError):
    """The step loop failed (for example an expert-parallel rank died); the engine takes no more work."""


class EngineLoop:
    def __init__(self, engine: Engine, deliver: Deliver, on_stats: Callable[[EngineStats], None] | None = None,
                 idle_wait_s: float = 0.05, stats_period_s: float = 0.1):
        self.engine, self.deliver, self.on_stats = engine, deliver, on_stats
        self.idle_wait_s, self.stats_period_s = idle_wait_s, stats_period_s
        self.error: BaseException | None = None
        self.closed = False
        self._lock = threading.Lock()  # held while stepping; only close() waits for it
        self._commands: deque[Callable[[], object]] = deque()
        self._when_idle: list[Callable[[], object]] = []  # run once no request is live (admin drains)
        self._wake = threading.Event()
        self._stats, self._stats_at = engine.stats(), time.monotonic()
        self._thread: threading.Thread | None = None

    # --- commands (any thread) -----------------------------------------------------------------

    def command(self, command: Callable[[], object]) -> None:
        self._commands.append(command)  # deque.append is atomic: no lock
        self._wake.set()

    def admit(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
        self.command(lambda: self._admit(request, embeddings))

    def add_embeddings(self, request_id: str, image_index: int, tensor: torch.Tensor) -> None:
        self.command(lambda: self.engine.add_embeddings(request_id, image_index, tensor))

    def fail(self, request_id: str, message: str, error_type: ErrorKind = ErrorKind.INTERNAL) -> None:
        self.command(lambda: self.engine.fail(request_id, message, error_type))

    def abort(self, request_id: str) -> None:
        self.command(lambda: self.engine.abort(request_id))

    def when_missing(self, request_id: str, indexes: list[int], reply: Callable[[list[int]], None]) -> None:
        """Call reply (on the loop's thread) with those of `indexes` whose embeddings the request still
        lacks, once every command queued before this one is applied ([] if the request ended)."""
        self.command(lambda: reply(sorted(set(indexes) & set(self.engine.missing_embeddings(request_id)))))

    def when_idle(self, action: Callable[[], object]) -> None:
        """On the loop's thread only (inside a command): run `action` there once no request is live."""
        self._when_idle.append(action)

    def stats(self) -> EngineStats:
        """As of the last refresh (at most stats_period_s old while the loop steps)."""
        return self._stats

    # --- the loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def run(self) -> None:
        while not self.closed:
            with self._lock:
                steps_before = self.engine.steps_run
                try:
                    self._apply_commands()
                    outputs = self.engine.step()
                except Exception as e:  # the group or the model is broken: fail everything, stop
                    log.exception("the engine step failed; the engine stops and fails its %d live requests",
                                  len(self.engine.states))
                    self.error = e
                    outputs = self.engine.fail_all(STEP_FAILED)
                ran = self.engine.steps_run > steps_before
                self._refresh_stats()
            if outputs:
                self.deliver(outputs)
            if self._when_idle:  # after the last outputs went out
                with self._lock:
                    if self._idle_actions():
                        self._refresh_stats(force=True)
            if self.error is not None:
                return
            if not ran and not self._commands:  # nothing schedulable (idle, or waiting for embeddings)
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()

    def close(self) -> None:
        self.closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            self._apply_commands()
            self.engine.close()

    def check_alive(self) -> None:
        if self.error is not None or self.closed:
            raise EngineDeadError(f"the engine stopped: {self.error or 'closed'}")

    def _admit(self, request: EngineRequest, embeddings: Sequence[tuple[int, torch.Tensor]]) -> None:
        if self.engine.sleep_level:  # the replica's door refuses first; this covers direct callers
            self.deliver([error_output(request.request_id, "the engine is asleep", ErrorKind.UNAVAILABLE)])
            self.engine.hooks.released(request.request_id)
            return
        try:
            self.engine.add_request(request)
        except RequestError as e:  # it can never run: the first output says why, and nothing is held
            self.deliver([error_output(request.request_id, str(e), ErrorKind.INVALID_REQUEST)])
            self.engine.hooks.released(request.request_id)
            return
        for index, tensor in embeddings:
            self.engine.add_embeddings(request.request_id, index, tensor)

    def _apply_commands(self) -> None:
        while self._commands:
            self._commands.popleft()()

    def _idle_actions(self) -> list[Callable[[], object]]:
        """Run what waits for an idle engine, if it is idle now (outputs not yet delivered count as live)."""
        if not self._when_idle or self.engine.has_unfinished():
            return []
        actions, self._when_idle = self._when_idle, []
        for action in actions:
            action()
        return actions

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_at >= self.stats_period_s:
            self._stats, self._stats_at = self.engine.stats(), now
            if self.on_stats is not None:
                self.on_stats(self._stats)
