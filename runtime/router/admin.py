"""The admin endpoints' work in the router: parse a body, send the operation to every LM replica.

A Serve handle call reaches one replica; an admin operation must reach all of them. The replicas
are those the stats board has heard from in the last seconds (every LM replica reports there), and
each gets its own call, an AdminCall naming it, which the LM request router
(runtime.router.request_router) sends to that replica only. Calls run concurrently; each replica
answers with an AdminResult once its engine applied the operation (runtime.lm_service.admin).

The board also keeps what the pool was made into (weights version and path, sleep level): a
replica that starts later (autoscaling, a replacement) loads the same weights, and routers refuse
requests with 503 while the pool sleeps. A weight update that some replica refuses (a checkpoint
of another shape, a missing tensor) is undone on the replicas that took it, so the pool never
serves two versions after the call returns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from runtime.errors import RequestError
from runtime.protocol import (
    AdminAbort,
    AdminCall,
    AdminOp,
    AdminResult,
    AdminSleep,
    AdminUpdateWeights,
    AdminWake,
    ErrorKind,
)

log = logging.getLogger(__name__)

MODES = ("drain", "abort")


def _mode(body: dict[str, Any]) -> str:
    mode = body.get("mode", "drain")
    if mode not in MODES:
        raise RequestError(f"mode must be one of {list(MODES)}", "mode")
    return str(mode)


def _only(body: dict[str, Any], fields: set[str], path: str) -> None:
    unknown = sorted(k for k in body if k not in fields)
    if unknown:
        raise RequestError(f"{unknown[0]} is not supported by {path} (supported fields: {', '.join(sorted(fields))})",
                           unknown[0])


def parse_abort(body: dict[str, Any]) -> AdminAbort:
    """{"rid": id or [ids]} (SGLang's name; a /generate rid also names its samples), or {} for all."""
    _only(body, {"rid"}, "/admin/abort")
    rid = body.get("rid")
    ids = [rid] if isinstance(rid, str) else rid
    if ids is not None and not (isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids)):
        raise RequestError("rid must be a request id or a non-empty list of them (leave it out to abort all)", "rid")
    return AdminAbort(ids)


def parse_sleep(body: dict[str, Any]) -> AdminSleep:
    _only(body, {"level", "mode"}, "/admin/sleep")
    level = body.get("level", 1)
    if level not in (1, 2) or isinstance(level, bool):
        raise RequestError("level must be 1 (free the KV cache) or 2 (the weights too)", "level")
    return AdminSleep(int(level), _mode(body))


def parse_wake(body: dict[str, Any]) -> AdminWake:
    _only(body, set(), "/admin/wake")
    return AdminWake()


def parse_update(body: dict[str, Any], version: int) -> AdminUpdateWeights:
    _only(body, {"path", "mode"}, "/admin/update_weights")
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise RequestError("path must be a checkpoint directory that every LM replica can read", "path")
    return AdminUpdateWeights(path, version, _mode(body))


@dataclass
class Outcome:
    """Every replica's result of one operation."""

    results: list[AdminResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def error_kind(self) -> ErrorKind | None:
        """None when every replica succeeded; INVALID_REQUEST when one refused the client's input
        (a checkpoint that does not fit); else INTERNAL."""
        if self.ok:
            return None
        kinds = {r.error_type for r in self.results if not r.ok}
        return ErrorKind.INVALID_REQUEST if ErrorKind.INVALID_REQUEST in kinds else ErrorKind.INTERNAL

    def first_error(self) -> str:
        failed = next(r for r in self.results if not r.ok)
        return f"replica {failed.replica}: {failed.error}"

    def body(self) -> dict[str, Any]:
        return {"replicas": [{"replica": r.replica, "ok": r.ok, "error": r.error, "aborted": r.aborted,
                              "sleep_level": r.sleep_level, "weights_version": r.weights_version,
                              "seconds": round(r.seconds, 4)} for r in self.results],
                "seconds": round(self.seconds, 4)}


class AdminFanOut:
    def __init__(self, lm: Any, board: Any, timeout_s: float, model_dir: str):
        self.lm, self.board, self.timeout_s = lm, board, timeout_s
        self.model_dir = model_dir  # what the replicas serve before any update

    async def replicas(self) -> list[str]:
        return sorted((await self.board.snapshot.remote()).get("lm", {}))

    async def run(self, op: AdminOp, replicas: list[str] | None = None) -> Outcome:
        started = time.perf_counter()
        ids = replicas if replicas is not None else await self.replicas()
        results = await asyncio.gather(*(self._one(rid, op) for rid in ids))
        return Outcome(list(results), time.perf_counter() - started)

    async def _one(self, replica: str, op: AdminOp) -> AdminResult:
        try:
            return await asyncio.wait_for(self.lm.admin.remote(AdminCall(replica, op)), self.timeout_s)
        except Exception as e:  # gone, or too slow: say so for this replica (the caller is an operator)
            log.warning("admin %s on replica %s failed", type(op).__name__, replica, exc_info=True)
            return AdminResult(replica, False, f"{type(e).__name__}: {e}", ErrorKind.INTERNAL)

    async def update_weights(self, body: dict[str, Any]) -> Outcome:
        """Every replica loads the checkpoint as the next version; if one refuses, those that took
        it go back to the weights they had, and the version stays."""
        state = await self.board.admin_state.remote()
        op = parse_update(body, state["weights_version"] + 1)
        outcome = await self.run(op)
        if outcome.ok:
            await self.board.set_admin_state.remote({"weights_version": op.version, "weights_path": op.path})
            return outcome
        took = [r.replica for r in outcome.results if r.ok]
        if took:
            await self.run(AdminUpdateWeights(state["weights_path"] or self.model_dir, state["weights_version"]), took)
        return outcome
