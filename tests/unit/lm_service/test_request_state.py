"""RequestState's routed experts: kept only when asked, each position once, handed out at the end."""

from __future__ import annotations

import numpy as np

from runtime.lm_service.request_state import EngineRequest, RequestState
from runtime.lm_service.scheduler import Sequence
from runtime.protocol import SamplingParams


def _state(ask: bool) -> RequestState:
    params = SamplingParams(temperature=0.0, max_tokens=2, return_routed_experts=ask)
    request = EngineRequest("r", [1, 2, 3, 4], params)
    return RequestState(request, Sequence("r", [1, 2, 3, 4], 4), 2, (0,), None)


def _rows(first: int, n: int) -> np.ndarray:
    """Rows of positions first.. [n, 2 layers, 2 experts]: position p routes to (p, p+100) and (p+200, p+300)."""
    p = np.arange(first, first + n)[:, None, None]
    return (p + np.array([[0, 100], [200, 300]])).astype(np.int16)


def test_not_asked_keeps_nothing() -> None:
    state = _state(ask=False)
    state.add_routing(0, _rows(0, 4))
    assert state.routing is None and state.accept(7, None).routed_experts is None


def test_recompute_after_preemption_keeps_the_first_record_once() -> None:
    state = _state(ask=True)
    state.add_routing(0, _rows(0, 3))  # a prefill chunk
    state.add_routing(3, _rows(3, 1))
    first = state.accept(7, None)
    assert not first.finished and first.routed_experts is None, "only the last output carries them"
    state.add_routing(0, _rows(0, 5) + 1000)  # preempted: positions 0..4 run again; 0..3 are known
    last = state.accept(8, None)
    assert last.finished and last.routed_experts is not None
    routing = last.routed_experts
    assert routing.shape == (5, 2, 2) and routing.dtype == "int16"
    got = np.frombuffer(routing.data, "<i2").reshape(routing.shape)
    expected = np.concatenate([_rows(0, 4), _rows(4, 1) + 1000])
    assert (got == expected).all()
