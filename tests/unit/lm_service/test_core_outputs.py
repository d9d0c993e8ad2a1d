"""Where an engine core sends each step's outputs (runtime.lm_service.engine_core._Outputs)."""

from __future__ import annotations

import msgspec
import zmq

from runtime.lm_service.engine_core import _Outputs
from runtime.protocol import CoreOutputs, RequestOutput, TokenBatch


class _Events:
    def __init__(self) -> None:
        self.sent: list[CoreOutputs] = []

    def send(self, event: CoreOutputs) -> None:
        self.sent.append(event)


def test_a_routers_requests_go_to_its_inbox_in_one_message_and_the_replica_hears_only_their_ends() -> None:
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    address = f"tcp://127.0.0.1:{inbox.bind_to_random_port('tcp://127.0.0.1')}"
    events = _Events()
    outputs = _Outputs(context, events)  # type: ignore[arg-type]
    try:
        outputs.admitted("a", address)
        outputs.admitted("b", address)
        outputs.admitted("mine", None)
        outputs.admitted("gone", address)
        outputs.forget("gone")  # aborted: no last output will come
        step = [RequestOutput("a", [1], "x"), RequestOutput("b", [2], "y", True, "stop"),
                RequestOutput("mine", [3], "z"), RequestOutput("gone", [4], "w")]
        outputs.send(step)
        assert inbox.poll(5000)
        batch = msgspec.msgpack.decode(inbox.recv(), type=TokenBatch)
        assert [o.request_id for o in batch.outputs] == ["a", "b"] and not any(o.relayed for o in batch.outputs)
        (event,) = events.sent
        assert [(o.request_id, o.relayed) for o in event.outputs] == [("b", True), ("mine", False), ("gone", False)]
        end = event.outputs[0]  # how it ended, without the payload the router already has
        assert end.finish_reason == "stop" and end.token_ids == [] and end.text == ""

        outputs.send([RequestOutput("b", [5], "late")])  # b ended: whatever still comes goes to the replica
        assert not inbox.poll(100)
        assert events.sent[-1].outputs[0].request_id == "b"
    finally:
        outputs.close()
        inbox.close()
        context.destroy(linger=0)
