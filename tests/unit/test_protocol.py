"""The error-kind enum: it travels as its value, and an image's kind becomes its request's kind."""

from __future__ import annotations

import msgspec
import pytest

from runtime.lm_service.engine_loop import encode_failure
from runtime.protocol import EncodeError, ErrorKind, RequestOutput


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_a_kind_travels_as_its_value_and_comes_back_as_the_enum(kind) -> None:
    out = RequestOutput("r", [], "", True, "error", "why", error_type=kind)
    wire = msgspec.msgpack.encode(out)
    assert kind.value.encode() in wire
    back = msgspec.msgpack.decode(wire, type=RequestOutput).error_type
    assert back is kind and back == kind.value


def test_an_unknown_kind_is_refused_on_decode() -> None:
    wire = msgspec.msgpack.encode(RequestOutput("r", [], "", True, "error", "why", error_type="oops"))  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError, match="error_type"):
        msgspec.msgpack.decode(wire, type=RequestOutput)


@pytest.mark.parametrize("image_kind,request_kind", [
    (ErrorKind.INVALID_IMAGE, ErrorKind.INVALID_REQUEST),
    (ErrorKind.IMAGE_TOO_LARGE, ErrorKind.INVALID_REQUEST),
    (ErrorKind.INTERNAL, ErrorKind.INTERNAL),
    (ErrorKind.TIMEOUT, ErrorKind.TIMEOUT),
])
def test_a_failed_image_fails_its_request_with_the_matching_kind(image_kind, request_kind) -> None:
    message, kind = encode_failure(EncodeError("r", 2, "cannot be decoded", image_kind, "tcp://v:1"))
    assert kind is request_kind and message == "image 2: cannot be decoded"
