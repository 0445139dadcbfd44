"""A burst of 1000 requests over 5 models of 40 GB with a budget for 2 (process runtime, fake engines),
streaming and not, ~10% of clients leaving after a random short delay. Every request is accounted
for: answered in full, refused with a clear OpenAI-shaped error, or abandoned by its client; none
lost, the ledger never over budget (audited by replaying every transition event), no deadlock.

The figures are printed (`pytest -s`) and written as JSON to $SPARKGATE_CHAOS_REPORT when set."""

import asyncio
import collections
import json
import os
import platform
import random
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tests.chaos.util import assert_openai_error
from tests.harness import fake_engine_spec, run_gateway, write_models
from waker.events import Event
from waker.scheduling.plan import held_gb
from waker.state import ModelState

MODELS = [f"burst-{i}" for i in range(5)]
MEMORY_GB = 40
CAPACITY_GB = 100
REQUESTS = int(os.environ.get("SPARKGATE_BURST_REQUESTS", "1000"))
CONCURRENCY = 100
ABANDON_SHARE = 0.10
DEADLINE_S = 180


def expected_text(tokens: int) -> str:
    return "".join(f" t{i}" for i in range(tokens))


def classify_stream(text: str, tokens: int) -> str:
    """A stream is answered when it carries every token and ends with [DONE]; an error event must be
    OpenAI-shaped."""
    content, done = "", False
    for event in text.split("\n\n"):
        if not event or event.startswith(":"):  # keep-alive comments while the model starts
            continue
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        payload = json.loads(data)
        if "error" in payload:
            return "error:stream:" + str(assert_openai_error(payload)["code"])
        content += payload["choices"][0]["delta"].get("content") or ""
    if done and content == expected_text(tokens):
        return "answered"
    return f"broken:incomplete stream ({len(content)} chars, done={done})"


async def test_burst_of_1000_over_five_models_with_room_for_two(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("SPARKGATE_BURST_SEED", "1")))
    specs = [fake_engine_spec(name, "--token-delay", "0.005", memory_gb=MEMORY_GB, idle_timeout=0, stop_timeout="5s")
             for name in MODELS]
    models = write_models(tmp_path, *specs)
    nodes = {"local": {"total_gb": CAPACITY_GB, "reserve_gb": 0, "memory_probe": "none"}}
    plan = [(rng.choice(MODELS), rng.random() < 0.5, rng.randint(1, 8),
             rng.uniform(0.0, 0.5) if rng.random() < ABANDON_SHARE else None) for _ in range(REQUESTS)]

    async with run_gateway(models, nodes=nodes, max_queue=REQUESTS, max_wait=120, max_hold=1,
                           keepalive_interval=1) as gw:
        # Every event of the run, whatever the EventLog ring keeps (1000 by default).
        seen: list[Event] = []

        async def record() -> None:
            async for event in gw.waker.events.subscribe():
                seen.append(event)

        recorder = asyncio.create_task(record())
        await asyncio.sleep(0)  # the subscription is registered at the recorder's first step
        booted = gw.waker.events.recent()  # whatever came before it (or with it: counted once below)

        outcomes: dict[int, str] = {}
        left_on_purpose: set[int] = set()
        slots = asyncio.Semaphore(CONCURRENCY)
        # Idle pooled connections are dropped by the client before uvicorn closes them (its keep-alive
        # timeout is 5 s, httpx's expiry too): else a request sent on a connection the server is
        # closing at that instant fails with ReadError, a client artefact that is not what is tested.
        limits = httpx.Limits(max_connections=CONCURRENCY + 10, max_keepalive_connections=CONCURRENCY,
                              keepalive_expiry=2)
        loop = asyncio.get_running_loop()

        async def one(n: int, client: httpx.AsyncClient) -> None:
            model, stream, tokens, abandon_after = plan[n]
            body = {"model": model, "messages": [{"role": "user", "content": f"request {n}"}],
                    "max_tokens": tokens, "stream": stream}
            async with slots:
                me = asyncio.current_task()
                assert me is not None
                timer = None
                if abandon_after is not None:
                    def abandon() -> None:
                        left_on_purpose.add(n)
                        me.cancel()
                    timer = loop.call_later(abandon_after, abandon)
                try:
                    resp = await client.post(gw.v1 + "/chat/completions", json=body)
                    if timer is not None:
                        timer.cancel()
                    if resp.status_code != 200:
                        error = assert_openai_error(resp.json())
                        outcomes[n] = f"error:{resp.status_code}:{error['code']}"
                    elif stream:
                        outcomes[n] = classify_stream(resp.text, tokens)
                    else:
                        content = resp.json()["choices"][0]["message"]["content"]
                        outcomes[n] = "answered" if content == expected_text(tokens) else "broken:wrong content"
                except asyncio.CancelledError:
                    if n not in left_on_purpose:
                        raise
                    outcomes[n] = "abandoned"
                except (httpx.HTTPError, ValueError, AssertionError) as exc:
                    outcomes[n] = f"broken:{type(exc).__name__}: {exc}"

        began = time.monotonic()
        async with httpx.AsyncClient(timeout=150, limits=limits) as client, asyncio.timeout(DEADLINE_S):
            tasks = [asyncio.create_task(one(n, client)) for n in range(REQUESTS)]
            await asyncio.gather(*tasks)
        elapsed = time.monotonic() - began

        # Quiescent afterwards: nothing in flight, waiting or queued (nothing leaked by the cancels).
        admission = gw.waker.admissions["local"]
        for name in MODELS:
            controller = gw.waker.controller(name)
            assert controller.in_flight == 0 and controller.waiting == 0, name
        assert admission.queued == 0
        await asyncio.sleep(0)
        recorder.cancel()
        assert seen[-len(gw.waker.events.recent()):] == gw.waker.events.recent()  # the recorder missed nothing

    # Ledger audit: replay every transition since boot.
    seen = booted + [e for e in seen if not any(e is b for b in booted)]
    state = dict.fromkeys(MODELS, ModelState.STOPPED)
    high_water = 0.0
    transitions = 0
    for event in seen:
        if event.kind == "transition":
            transitions += 1
            state[event.model] = ModelState(event.target)
            held = sum(held_gb(state[m], MEMORY_GB, 0.0) for m in MODELS)
            assert held <= CAPACITY_GB, f"over budget ({held} GB) after {event}"
            high_water = max(high_water, held)
    assert admission.high_water_gb <= CAPACITY_GB

    kinds = collections.Counter(outcomes.values())
    answered = kinds.pop("answered", 0)
    abandoned = kinds.pop("abandoned", 0)
    broken = {k: v for k, v in kinds.items() if k.startswith("broken:")}
    errors = {k: v for k, v in kinds.items() if k.startswith("error:")}
    lost = REQUESTS - len(outcomes)
    waits = [e.data["waited_s"] for e in seen if e.kind == "admit"]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "requests": REQUESTS, "models": len(MODELS), "memory_gb_each": MEMORY_GB, "budget_gb": CAPACITY_GB,
        "concurrency": CONCURRENCY, "answered": answered, "errors": errors, "abandoned": abandoned,
        "broken": broken, "lost": lost, "starts": sum(gw.starts(m) for m in MODELS),
        "evictions": sum(1 for e in seen if e.kind == "evict"), "transitions": transitions, "events": len(seen),
        "max_queue_wait_s": max(waits, default=0.0), "budget_high_water_gb": high_water,
        "elapsed_s": round(elapsed, 1),
    }
    print("\nburst:", json.dumps(report, indent=2))
    if path := os.environ.get("SPARKGATE_CHAOS_REPORT"):
        Path(path).write_text(json.dumps(report, indent=2) + "\n")

    assert lost == 0
    assert not broken, broken
    assert answered + abandoned + sum(errors.values()) == REQUESTS
    assert answered >= 0.8 * REQUESTS  # a queue this size is served, not refused
    assert high_water <= CAPACITY_GB
