"""runtime.serve_compat against the installed Ray: every private symbol it relies on still exists and
takes the parameters it passes (a Ray upgrade that moves one fails here, by name), and the request
router's hand-over keeps FIFO order while letting a request refuse a replica."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from runtime import serve_compat
from runtime.router.request_router import AffinityRouter

_MISSING = object()


def _member(owner: Any, name: str) -> Any:
    """A class or module member: an attribute, a dataclass field or an annotation-only declaration."""
    value = inspect.getattr_static(owner, name, _MISSING)
    if value is not _MISSING or not inspect.isclass(owner):
        return value
    if dataclasses.is_dataclass(owner) and name in {f.name for f in dataclasses.fields(owner)}:
        return None
    declared = any(name in getattr(cls, "__annotations__", {}) for cls in owner.__mro__)
    return None if declared else _MISSING


def ray_symbol_problem(module: str, path: str, params: tuple[str, ...] | None) -> str | None:
    """Why `module.path` is not what runtime.serve_compat expects of Ray, or None."""
    where = f"{module}.{path} (relied on by runtime/serve_compat.py, Ray {ray.__version__})"
    try:
        owner: Any = importlib.import_module(module)
    except ImportError as e:
        return f"Ray no longer has the module {module}: {where} ({e})"
    for name in path.split("."):
        owner = _member(owner, name)
        if owner is _MISSING:
            return f"Ray no longer has {where}"
    if params is not None:
        got = list(inspect.signature(inspect.unwrap(owner)).parameters)
        if any(p not in got for p in params):
            return f"Ray changed the signature of {where}: takes {got}, serve_compat passes {list(params)}"
    return None


@pytest.mark.parametrize(("module", "path", "params"), serve_compat.RELIES_ON,
                         ids=[f"{m}.{p}" for m, p, _ in serve_compat.RELIES_ON])
def test_ray_still_has_what_serve_compat_relies_on(module: str, path: str, params: tuple[str, ...] | None) -> None:
    problem = ray_symbol_problem(module, path, params)
    assert problem is None, problem


@pytest.mark.parametrize(("module", "path", "params", "says"), [
    ("ray.serve._private.no_such_module", "x", None, "no longer has the module ray.serve._private.no_such_module"),
    ("ray.serve._private.replica", "no_such_function", None, "no longer has ray.serve._private.replica.no_such_f"),
    ("ray.serve._private.replica", "add_port_to_grpc_server", ("server", "port"), "changed the signature of"),
])
def test_a_symbol_ray_moved_is_named_in_the_failure(module: str, path: str, params: Any, says: str) -> None:
    problem = ray_symbol_problem(module, path, params)
    assert problem is not None and says in problem and "serve_compat" in problem


def test_the_replica_workarounds_patch_what_they_name() -> None:
    from ray.serve._private import replica

    saved = replica._get_in_flight_requests, replica.add_port_to_grpc_server
    try:
        serve_compat.apply_in_replica()
        serve_compat.apply_in_replica()  # a second replica constructor in the process wraps nothing twice
        assert replica.add_port_to_grpc_server.binds_node_address
        assert replica.add_port_to_grpc_server.__closure__[0].cell_contents is saved[1]
        assert replica._get_in_flight_requests("no-such-request") == {}
    finally:
        replica._get_in_flight_requests, replica.add_port_to_grpc_server = saved


# --- the request router's hand-over, over the internals serve_compat relies on -----------------


def _pending(target: str | None = None) -> Any:
    request = SimpleNamespace(replica=target) if target else SimpleNamespace()
    return SimpleNamespace(args=[request], future=Future())


def _router(pending: list[Any]) -> Any:
    router = object.__new__(AffinityRouter)  # only what the hand-over touches
    router._pending_requests_to_fulfill = deque(pending)
    router._cancel_routing_task_for_pending_request = lambda p: None
    router._record_queue_wait_time = lambda p: None
    router.removed = []
    router._remove_pending_request_from_indices = router.removed.append
    return router


def _replica(unique_id: str) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id))


def test_an_admin_call_waits_for_its_own_replica_while_others_take_the_one_found() -> None:
    for_b, plain, done = _pending("B"), _pending(), _pending()
    done.future.cancel()
    router = _router([done, for_b, plain])
    a = _replica("A")
    router._fulfill_next_pending_request(a)
    assert plain.future.result() is a and not for_b.future.done()
    assert list(router._pending_requests_to_fulfill) == [for_b] and router.removed == [plain]
    b = _replica("B")
    router._fulfill_next_pending_request(b)
    assert for_b.future.result() is b and not router._pending_requests_to_fulfill
