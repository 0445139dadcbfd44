"""The waiting path's small pieces under hostile input (gateway/progress.py, gateway/hints.py): the last progress
chunk of a wait that failed, junk SDK timeout headers, one background warm per model, and Retry-After at the edge of
what the SDKs honour (59 s yes, 60 s no). End to end: tests/integration/test_waiting_hostile.py."""

import asyncio
import json
from typing import Any

import pytest

from gateway import errors, hints, progress
from waker.config.spec import Progress
from waker.errors import StartFailed


def payload(chunk: bytes) -> Any:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    return json.loads(chunk[len(b"data: "):])


def test_the_last_chunk_of_a_failed_wait_never_says_ready() -> None:
    """Before: there was only `done()`, "<model> is ready", sent just above the error of a start that failed."""
    webui = progress.Reporter(Progress.OPEN_WEBUI, "big", "big-served", refresh=10, arrived=100.0)
    status = payload(webui.failed(now=140.0))["event"]["data"]
    assert status == {"description": "big could not be woken", "done": True, "hidden": True}
    thinker = progress.Reporter(Progress.REASONING, "big", "big-served", refresh=10, arrived=100.0)
    delta = payload(thinker.failed(now=140.0))["choices"][0]["delta"]
    assert delta == {"role": "assistant", "reasoning_content": "big could not be woken after 40 s.\n\n"}
    assert payload(thinker.done(now=140.0))["choices"][0]["delta"]["reasoning_content"].startswith("big is ready")


@pytest.mark.parametrize("value", [b"nan", b"-nan", b"-1", b"-0.5", b"1e309", b"-1e309", b"", b" ", b"9" * 5000,
                                   b"inf", b"Infinity", b"abc", b"0x10", b"5\x00", b"\xff", b"\xef\xbc\x95", b"5s"])
def test_junk_timeout_headers_say_nothing(value: bytes) -> None:
    for name in hints.TIMEOUT_HEADERS:
        assert hints.client_timeout([(name, value)]) is None


def test_a_junk_timeout_header_does_not_hide_a_good_one() -> None:
    found = hints.client_timeout([(b"x-stainless-read-timeout", b"nan"), (b"x-stainless-timeout", b"600"),
                                  (b"x-stainless-read-timeout", b"-1")])
    assert found == hints.ClientTimeout(600.0, "x-stainless-timeout")


class FakeGate:
    """Just what `Warmer` uses of a gate: its spec's name and `warm()`, counted and held until released."""

    def __init__(self, name: str) -> None:
        self.spec = type("Spec", (), {"name": name})()
        self.warms = 0
        self.release = asyncio.Event()

    async def warm(self) -> None:
        self.warms += 1
        await self.release.wait()


async def test_two_warms_of_one_model_at_once_are_one() -> None:
    warmer = hints.Warmer()
    gate = FakeGate("big")
    first, second = warmer.warm(gate), warmer.warm(gate)  # type: ignore[arg-type]
    assert first is second
    await asyncio.sleep(0)
    assert gate.warms == 1
    gate.release.set()
    await first
    third = warmer.warm(gate)  # type: ignore[arg-type]
    assert third is not first  # ended: the next one is a new warm
    await third
    assert gate.warms == 2


@pytest.mark.parametrize(("wait", "after", "ms"), [(58.9994, "59", "58999"), (59.0, "59", "59000"),
                                                     (59.0004, "59", "59000"), (59.6, "59", "59000"),
                                                     (60.0, "59", "59000"), (3600.0, "59", "59000")])
def test_a_client_that_would_time_out_is_told_under_60_s(wait: float, after: str, ms: str) -> None:
    headers = dict(errors.client_would_time_out("big", wait, 10, "x-stainless-read-timeout").headers())
    assert headers[b"retry-after"].decode() == after and headers[b"retry-after-ms"].decode() == ms
    assert headers[b"x-should-retry"] == b"true"


@pytest.mark.parametrize(("backoff", "retry", "after"), [(59.0, b"true", "59"), (59.0004, b"false", "60"),
                                                         (60.0, b"false", "60")])
def test_a_backoff_at_59_is_retried_and_at_60_is_not(backoff: float, retry: bytes, after: str) -> None:
    error = errors.from_waker(StartFailed("big failed", model="big", retry_after=backoff))
    headers = dict(error.headers())
    assert headers[b"x-should-retry"] == retry and headers[b"retry-after"].decode() == after
