"""An admin operation's outcome over every replica, as the client gets it."""

from __future__ import annotations

import pytest

from runtime.protocol import AdminResult, ErrorKind
from runtime.router.admin import Outcome
from runtime.router.openai_api import kind_error


@pytest.mark.parametrize("kinds,status,kind_name", [
    ([None, None], None, None),
    ([None, ErrorKind.INTERNAL], 500, "server_error"),
    ([ErrorKind.INTERNAL, ErrorKind.INVALID_REQUEST], 400, "invalid_request_error"),
])
def test_a_refused_input_is_a_400_and_any_other_failure_a_500(kinds, status, kind_name) -> None:
    results = [AdminResult(f"r{i}", kind is None, None if kind is None else "why", kind)
               for i, kind in enumerate(kinds)]
    outcome = Outcome(results, 0.1)
    if status is None:
        assert outcome.ok and outcome.error_kind() is None
        return
    error = kind_error(outcome.error_kind(), outcome.first_error())
    assert (error.status, error.type) == (status, kind_name) and error.message.startswith("replica r")
