"""What a client hears when serving fails on our side: what failed and the request id, never the
exception's text, which goes to the router's log with its traceback."""

from __future__ import annotations

import logging

import pytest

from runtime.router.server import _internal_error, _LMFailed


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as e:
        return e


@pytest.mark.parametrize("error,what", [
    (RuntimeError("secret internal detail"), "the router failed"),
    (_LMFailed(retryable=False), "the LM replica serving it failed"),
])
def test_an_internal_failure_names_what_failed_and_the_request_but_not_the_exception(caplog, error, what) -> None:
    if isinstance(error, _LMFailed):
        error.__cause__ = RuntimeError("secret internal detail")
    with caplog.at_level(logging.ERROR, logger="runtime"):
        api_error = _internal_error("chatcmpl-42", _raised(error))
    assert (api_error.status, api_error.type) == (500, "server_error")
    assert api_error.message == f"request chatcmpl-42 failed: {what}; the server's log has the details"
    record, = caplog.records
    assert record.getMessage() == "chatcmpl-42: failed" and record.exc_info is not None
    assert "secret internal detail" in caplog.text
