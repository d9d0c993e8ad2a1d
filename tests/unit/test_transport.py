"""The ZMQ embedding path over real sockets: bit-exact tensors, errors, malformed frames, another process."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import msgspec
import pytest
import torch
import zmq

from runtime.protocol import EmbeddingHeader, EncodeError
from runtime.transport import EmbeddingInbox, EmbeddingSender, tensor_from_frame


def _inbox() -> tuple[EmbeddingInbox, queue.Queue]:
    got: queue.Queue = queue.Queue()
    inbox = EmbeddingInbox(lambda h, t: got.put((h, t.clone())), got.put)
    return inbox, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_arrive_bit_for_bit(dtype: torch.dtype) -> None:
    inbox, got = _inbox()
    sender = EmbeddingSender("vision-0")
    try:
        sent = torch.randn(37, 64).to(dtype)
        sender.send_embeddings(inbox.address, "req-1", 2, "abc", sent)
        header, received = got.get(timeout=5)
    finally:
        sender.close()
        inbox.close()
    assert header == EmbeddingHeader("req-1", 2, "abc", str(dtype).removeprefix("torch."), (37, 64), "vision-0")
    assert received.dtype == dtype and torch.equal(received, sent)


def test_received_tensor_wraps_the_frame_without_copying() -> None:
    frame = zmq.Frame(torch.arange(6, dtype=torch.float32).numpy().tobytes())
    header = EmbeddingHeader("r", 0, "h", "float32", (2, 3), "v")
    tensor = tensor_from_frame(header, frame)
    assert tensor.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert tensor.data_ptr() == torch.frombuffer(frame.buffer, dtype=torch.uint8).data_ptr()
    with pytest.raises(ValueError):
        tensor_from_frame(EmbeddingHeader("r", 0, "h", "float32", (4, 3), "v"), frame)


def test_errors_travel_and_malformed_messages_are_counted() -> None:
    inbox, got = _inbox()
    sender = EmbeddingSender("vision-1")
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(inbox.address)
    try:
        raw.send(b"not msgpack at all")
        header = msgspec.msgpack.encode(EmbeddingHeader("r", 0, "h", "float32", (2, 2), "v"))
        raw.send_multipart([header, b"short"])  # wrong byte count
        sender.send_error(inbox.address, "req-9", 1, "cannot identify image file", "invalid_image")
        error = got.get(timeout=5)
        deadline = time.monotonic() + 5  # two sockets: their messages may interleave in any order
        while inbox.malformed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        raw.close()
        sender.close()
        inbox.close()
    assert error == EncodeError("req-9", 1, "cannot identify image file", "invalid_image", "vision-1")
    assert inbox.malformed == 2 and got.empty()


def _send_from_another_process(address: str, seed: int) -> None:
    sender = EmbeddingSender("vision-proc")
    torch.manual_seed(seed)
    sender.send_embeddings(address, "req-p", 0, "h", torch.randn(300, 128))
    sender.close()


def test_embeddings_from_another_process() -> None:
    inbox, got = _inbox()
    try:
        proc = mp.get_context("spawn").Process(target=_send_from_another_process, args=(inbox.address, 5))
        proc.start()
        proc.join(timeout=60)
        header, received = got.get(timeout=10)
    finally:
        inbox.close()
    torch.manual_seed(5)
    assert header.sender == "vision-proc" and torch.equal(received, torch.randn(300, 128))


def test_a_sender_with_a_proxy_connects_through_it_and_reconnects_after_a_cut() -> None:
    from tests.multinode.relay import LossyRelay

    relay = LossyRelay("127.0.0.1", delay_s=0.01)
    inbox, got = _inbox()
    sender = EmbeddingSender("vision-0", proxy=relay.address)
    try:
        sent = torch.randn(5, 8)
        sender.send_embeddings(inbox.address, "req-1", 0, "abc", sent)
        header, received = got.get(timeout=10)
        assert header.request_id == "req-1" and torch.equal(received, sent)
        assert relay.stats.connections == 1 and relay.stats.targets == {inbox.address.removeprefix("tcp://")}
        relay.drop_every = relay.stats.chunks + 1  # the next chunk cuts the connection
        sender.send_embeddings(inbox.address, "req-2", 0, "abc", sent)  # lost with it
        deadline = time.monotonic() + 10
        while relay.stats.connections < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        relay.drop_every = 0
        sender.send_embeddings(inbox.address, "req-3", 0, "abc", sent)
        arrived = {got.get(timeout=10)[0].request_id}
        assert relay.stats.drops == 1 and relay.stats.connections == 2 and "req-3" in arrived
    finally:
        sender.close()
        inbox.close()
        relay.close()
