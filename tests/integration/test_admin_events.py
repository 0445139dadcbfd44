"""/admin/events for a client that stops reading (issue 17): past EVENTS_BACKLOG unread events its subscription is
dropped and its stream ends with a comment that says so; the gateway holds nothing for it any more."""

import asyncio
from pathlib import Path

import httpx

from gateway.admin import EVENTS_BACKLOG
from tests.chaos.util import until
from tests.harness import fake_engine_spec, run_gateway, write_models
from waker.events import Event


async def test_an_events_client_that_falls_behind_is_dropped_and_its_stream_ends_saying_so(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        events = gw.waker.events
        others = events.subscribers  # the gateway's own (metrics): unbounded, and never dropped
        lines: list[str] = []
        async with asyncio.timeout(20), client.stream("GET", gw.url + "/admin/events?recent=0") as stream:
            async for line in stream.aiter_lines():
                lines.append(line)
                if line == ": live":
                    await until(lambda: events.subscribers == others + 1, 5, "the client's subscription")
                    # More than it may leave unread, emitted in one step: the stream can't send any of them meanwhile.
                    for n in range(EVENTS_BACKLOG + 1):
                        events.emit(Event(float(n), "m", "test", reason=str(n)))
                    assert events.subscribers == others
        sent = [line for line in lines if line]
        assert sent[0] == ": live"
        assert sent[1:] == [f": fell behind: more than {EVENTS_BACKLOG} events waited unread: this subscription was "
                            "dropped; reconnect to follow again"]
        # A client that reconnects follows again.
        async with client.stream("GET", gw.url + "/admin/events?recent=1") as stream:
            first = await anext(stream.aiter_lines())
        assert first.startswith("data: ") and f'"reason": "{EVENTS_BACKLOG}"' in first
