"""Retry headers the OpenAI SDKs obey (gateway/errors.py): a retry-soon answer carries `x-should-retry: true` and a
Retry-After under 60 s (the Node SDK and the AI SDK ignore 60 and more) with `retry-after-ms`; a deterministic one
carries `x-should-retry: false` (the one-hour request_timeout and a broken engine were retried three times). Each
test failed before: no `retry-after-ms`, no `x-should-retry`, and Retry-After up to the 300 s backoff cap."""

import pytest

from gateway import errors
from gateway.errors import ApiError
from waker.errors import ModelNotFound, NoRoom, QueueFull, ShuttingDown, StartFailed, StartTimeout, WakerError


def headers(error: ApiError) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in error.headers()}


@pytest.mark.parametrize(("exc", "retry_after"), [
    (QueueFull("full", model="m"), "5"),
    (NoRoom("no room within max_wait", model="m", retry_after=30), "30"),
    (NoRoom("pinned models hold it", model="m"), "10"),
    (NoRoom("no room", model="m", retry_after=600), "59"),  # capped: 600 s is ignored by every SDK
    (ShuttingDown("the gateway is shutting down", model="m"), "5"),
    (StartFailed("exited with code 1", model="m"), "1"),  # a first failure: the next request starts it again
    (StartFailed("failed 5 times", model="m", retry_after=32), "32"),  # a backoff an SDK waits out
    (WakerError("something else", model="m"), "5"),
])
def test_retry_soon_answers_say_retry_with_a_retry_after_under_a_minute_and_in_ms(exc: WakerError,
                                                                                   retry_after: str) -> None:
    error = errors.from_waker(exc)
    got = headers(error)
    assert got["x-should-retry"] == "true"
    assert got["retry-after"] == retry_after
    assert got["retry-after-ms"] == str(int(retry_after) * 1000)
    assert float(got["retry-after"]) < 60 and float(got["retry-after-ms"]) < 60_000


def test_a_backoff_longer_than_the_cap_says_do_not_retry_with_the_real_wait() -> None:
    # Python >= 2.52 would not retry above 120 s anyway; Node and older Python would retry after 0.5-8 s into the
    # same refusal; the AI SDK (which ignores x-should-retry) falls back to its 2 s / 4 s backoff for >= 60 s.
    error = errors.from_waker(StartFailed("failed 9 times in a row; next start attempt in 5m", model="m",
                                          retry_after=300))
    got = headers(error)
    assert got["x-should-retry"] == "false"
    assert got["retry-after"] == "300" and got["retry-after-ms"] == "300000"
    assert error.status == 503 and error.code == "model_start_failed"


def test_a_start_timeout_is_not_retried_even_without_a_backoff() -> None:
    # A retry would wait the whole start_timeout again.
    got = headers(errors.from_waker(StartTimeout("did not become ready within 10m", model="m")))
    assert got["x-should-retry"] == "false" and got["retry-after"] == "1"


@pytest.mark.parametrize(("error", "should_retry"), [
    (errors.request_timeout(3600), "false"),
    (errors.upstream_unreachable("m", "Server disconnected"), "false"),
    (errors.upstream_timeout("m", 900), "false"),
    (errors.upstream_connect_timeout("m", 10), "true"),
])
def test_upstream_answers_that_would_repeat_a_long_wait_are_not_retried(error: ApiError, should_retry: str) -> None:
    got = headers(error)
    assert got["x-should-retry"] == should_retry
    assert "retry-after" not in got


@pytest.mark.parametrize("error", [
    errors.bad_json("Expecting value"), errors.missing_model(), errors.body_too_large(10), errors.unauthorized(),
    errors.forbidden("m"), errors.headers_too_large(10),
    errors.from_waker(ModelNotFound("no such model", model="m")), ApiError(400, "anything"),
])
def test_the_requests_own_faults_are_never_retried(error: ApiError) -> None:
    assert 400 <= error.status < 500
    assert headers(error)["x-should-retry"] == "false"


def test_a_429_408_or_409_keeps_the_sdk_default_unless_it_says_otherwise() -> None:
    for status in (408, 409, 429):
        assert "x-should-retry" not in headers(ApiError(status, "busy"))


def test_the_client_would_time_out_answer_retries_when_the_model_should_be_up() -> None:
    soon = headers(errors.client_would_time_out("big", 42.5, 2.0, "x-stainless-read-timeout"))
    assert soon["x-should-retry"] == "true"
    assert soon["retry-after"] == "43" and soon["retry-after-ms"] == "42500"
    later = errors.client_would_time_out("big", 180, 2.0, "x-stainless-read-timeout")
    assert headers(later)["retry-after"] == "59" and headers(later)["retry-after-ms"] == "59000"
    assert later.status == 503 and later.code == "model_not_ready"
    assert "x-stainless-read-timeout" in later.message and "3m" in later.message


def test_sub_second_waits_are_sent_exactly_in_ms_and_never_as_zero() -> None:
    got = headers(ApiError(503, "x", retry_after=0.25, should_retry=True))
    assert got["retry-after"] == "1" and got["retry-after-ms"] == "250"
    got = headers(ApiError(503, "x", retry_after=0, should_retry=True))
    assert got["retry-after"] == "1" and got["retry-after-ms"] == "1"
