"""dspark_request_errors_total: every request the decode loop fails is counted by its status code (the chart's
DSparkErrorRate alert reads it); an ApiError raised for the caller before the loop is passed through uncounted."""

from __future__ import annotations

import grpc

from dspark.router.grpc_api import ApiError, status_of
from dspark.serving import metrics


def errors(code: str) -> float:
    return metrics.REQUEST_ERRORS.labels(code=code)._value.get()


def test_a_failed_request_is_counted_by_its_status_code():
    before = errors("INVALID_ARGUMENT"), errors("DEADLINE_EXCEEDED")
    assert status_of(ValueError("max_tokens must be >= 1")).code == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(TimeoutError()).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (errors("INVALID_ARGUMENT"), errors("DEADLINE_EXCEEDED")) == (before[0] + 1, before[1] + 1)


def test_an_api_error_passes_through_uncounted():
    e = ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
    before = errors("UNAUTHENTICATED")
    assert status_of(e) is e
    assert errors("UNAUTHENTICATED") == before
