"""Metrics: driven through a real Waker with fake engines and a fake clock, read back by parsing `render()`
(what Prometheus would see), never by peeking at the metric objects. Engine relabelling is tested over
real HTTP against a tiny aiohttp server that serves a vLLM-like page."""

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from tests.fakes import FakeEngineApi, FakeRuntime
from tests.harness import serve_app
from waker.clock import FakeClock
from waker.config.registry import Registry
from waker.config.spec import ModelSpec, RuntimeKind
from waker.errors import StartFailed
from waker.events import Event
from waker.runtime.external import ExternalRuntime
from waker.runtime.memory import FixedProbe
from waker.scheduling.budget import Budget
from waker.scheduling.node import QueuePolicy
from waker.state import ModelState
from waker.waker import Waker

S = ModelState
Labels = dict[str, str]


def spec(name: str, gb: float, **fields: object) -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "command": ["x"], "memory_gb": gb, "min_uptime": 0, **fields})


def external(name: str, url: str, engine: str = "vllm") -> ModelSpec:
    return ModelSpec.model_validate({"name": name, "runtime": "external", "engine": engine, "url": url})


@asynccontextmanager
async def waker_with(*specs: ModelSpec, capacity: float = 100, live: float | None = None,
                     policy: QueuePolicy | None = None, auto_ready: bool = True) -> AsyncIterator[Waker]:
    """A started Waker on fake engines (as tests/unit/scheduling/test_admission.py builds it), with external
    endpoints."""
    runtime = FakeRuntime(auto_ready=auto_ready)
    runtimes = {RuntimeKind.PROCESS: runtime, RuntimeKind.EXTERNAL: ExternalRuntime()}
    waker = Waker(Registry(list(specs)), runtimes=runtimes,
                  budgets={"local": Budget(capacity, 0)}, probes={"local": FixedProbe(live)}, clock=FakeClock(),
                  queue=policy or QueuePolicy(), engine_api=FakeEngineApi(runtime))
    waker.runtime = runtime  # type: ignore[attr-defined]
    async with waker:
        yield waker


@asynccontextmanager
async def following(waker: Waker, **kwargs: object) -> AsyncIterator[Metrics]:
    """Metrics with its follow() task running, as the app's lifespan runs it."""
    metrics = Metrics(waker, **kwargs)  # type: ignore[arg-type]
    task = asyncio.create_task(metrics.follow())
    try:
        yield metrics
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def caught_up(metrics: Metrics, waker: Waker) -> None:
    """Wait until follow() has counted every event in the log (sparkgate_events_total says how many)."""
    for _ in range(100):
        counted = sum(v for (_, labels), v in samples(metrics, "sparkgate_events_total").items())
        if counted == len(waker.events.recent()):
            return
        await asyncio.sleep(0)
    raise AssertionError("follow() did not catch up with the event log")


def parse(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """family name -> {(sample name, sorted labels): value}."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        into = out.setdefault(family.name, {})
        for s in family.samples:
            into[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def samples(metrics: Metrics, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return parse(body.decode()).get(family.removesuffix("_total"), {})


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    """The value of one sample (by its full name, e.g. ..._total or ..._bucket), None if absent."""
    family = re.sub(r"(_total|_bucket|_count|_sum)$", "", name)
    return samples(metrics, family).get((name, tuple(sorted(labels.items()))))


def states(metrics: Metrics) -> dict[str, str]:
    """model -> the state whose one-hot sample is 1; fails unless there is exactly one per model."""
    ones: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for (_, labels), v in samples(metrics, "sparkgate_model_state").items():
        d = dict(labels)
        seen[d["model"]] = seen.get(d["model"], 0) + 1
        assert v in (0.0, 1.0)
        if v == 1.0:
            ones.setdefault(d["model"], []).append(d["state"])
    assert all(n == len(ModelState) for n in seen.values()), seen
    assert set(ones) == set(seen) and all(len(v) == 1 for v in ones.values()), ones
    return {model: found[0] for model, found in ones.items()}


async def use(waker: Waker, name: str) -> None:
    async with waker.lease(name):
        pass


# -- lifecycle through a real waker -------------------------------------------------------------------


async def test_cold_starts_eviction_states_and_budget() -> None:
    async with waker_with(spec("a", 40), spec("b", 40), spec("c", 40), capacity=100) as w, following(w) as m:
        assert value(m, "sparkgate_cold_starts_total", model="a") == 0  # zero series exist from the start
        await use(w, "a")
        w.clock.advance(1)
        await use(w, "b")
        w.clock.advance(1)
        await use(w, "c")  # evicts "a" (least recently used)
        await caught_up(m, w)

        for name in ("a", "b", "c"):
            assert value(m, "sparkgate_cold_starts_total", model=name) == 1
            assert value(m, "sparkgate_wake_duration_seconds_count", model=name, kind="start") == 1
        assert value(m, "sparkgate_evictions_total", model="a") == 1
        assert value(m, "sparkgate_evictions_total", model="b") == 0
        assert value(m, "sparkgate_start_failures_total", model="a") == 0
        assert value(m, "sparkgate_admission_wait_seconds_count", model="c") == 1
        assert states(m) == {"a": "stopped", "b": "ready", "c": "ready"}
        assert value(m, "sparkgate_budget_used_gb", node="local") == 80
        assert value(m, "sparkgate_budget_total_gb", node="local") == 100
        assert value(m, "sparkgate_budget_high_water_gb", node="local") == w.admissions["local"].high_water_gb == 80
        assert value(m, "sparkgate_model_memory_declared_gb", model="c") == 40
        assert value(m, "sparkgate_live_free_gb", node="local") is None  # the probe can't tell: no sample
        assert samples(m, "sparkgate_model_memory_live_gb") == {}  # no sampler given: no samples


async def test_start_duration_comes_from_the_ready_transition() -> None:
    async with waker_with(spec("slow", 10), auto_ready=False) as w, following(w) as m:
        request = asyncio.create_task(use(w, "slow"))
        await w.runtime.started.wait()  # type: ignore[attr-defined]
        w.clock.advance(42)  # the engine loads for 42 s of fake time
        w.runtime.handles[0].ready.set()  # type: ignore[attr-defined]
        await request
        await caught_up(m, w)
        assert value(m, "sparkgate_wake_duration_seconds_sum", model="slow", kind="start") == 42
        assert value(m, "sparkgate_wake_duration_seconds_bucket", model="slow", kind="start", le="30.0") == 0
        assert value(m, "sparkgate_wake_duration_seconds_bucket", model="slow", kind="start", le="60.0") == 1


async def test_failed_start_then_retry() -> None:
    async with waker_with(spec("m", 10)) as w, following(w) as m:
        w.runtime.fail_launch = RuntimeError("no such binary")  # type: ignore[attr-defined]
        with pytest.raises(StartFailed):
            await use(w, "m")
        await caught_up(m, w)
        assert value(m, "sparkgate_start_failures_total", model="m") == 1
        assert value(m, "sparkgate_crashes_total", model="m") == 0
        assert states(m) == {"m": "failed"}

        w.runtime.fail_launch = None  # type: ignore[attr-defined]
        w.clock.advance(600)  # past the backoff
        await use(w, "m")
        await caught_up(m, w)
        assert value(m, "sparkgate_cold_starts_total", model="m") == 2  # stopped -> starting, failed -> starting
        assert value(m, "sparkgate_start_failures_total", model="m") == 1
        assert states(m) == {"m": "ready"}


async def test_engine_crash_while_serving_is_a_crash_not_a_start_failure() -> None:
    async with waker_with(spec("m", 10)) as w, following(w) as m:
        await use(w, "m")
        w.runtime.handles[0].exit(137, "Killed")  # type: ignore[attr-defined]
        await w.events.wait_for(lambda e: e.kind == "transition" and e.target == "failed", 1)
        await caught_up(m, w)
        assert value(m, "sparkgate_crashes_total", model="m") == 1
        assert value(m, "sparkgate_start_failures_total", model="m") == 0


async def test_queue_depth_in_flight_and_waiting_while_a_request_waits_for_room() -> None:
    async with waker_with(spec("a", 60), spec("b", 60), capacity=100, live=75.5) as w, following(w) as m:
        lease = w.lease("a")
        await lease.__aenter__()  # a request in flight on "a" keeps it from being evicted
        waiting = asyncio.create_task(use(w, "b"))
        await w.events.wait_for(lambda e: e.kind == "queued" and e.model == "b", 1)
        await caught_up(m, w)

        assert value(m, "sparkgate_queue_depth", node="local") == 1
        assert value(m, "sparkgate_queue_depth_model", model="b") == 1
        assert value(m, "sparkgate_queue_depth_model", model="a") == 0
        assert value(m, "sparkgate_model_in_flight", model="a") == 1
        assert value(m, "sparkgate_model_waiting", model="b") == 1
        assert value(m, "sparkgate_queued_total", model="b") == 1
        assert value(m, "sparkgate_drains_total", model="a") == 1
        assert value(m, "sparkgate_live_free_gb", node="local") == 75.5
        assert states(m) == {"a": "ready", "b": "stopped"}

        await lease.__aexit__(None, None, None)  # "a" drains and stops, "b" starts
        await asyncio.wait_for(waiting, 1)
        await caught_up(m, w)
        assert value(m, "sparkgate_queue_depth", node="local") == 0
        assert value(m, "sparkgate_queue_depth_model", model="b") == 0
        assert value(m, "sparkgate_evictions_total", model="a") == 1
        assert states(m) == {"a": "stopped", "b": "ready"}


async def test_idle_stop_is_counted_by_action() -> None:
    async with waker_with(spec("m", 10, idle_timeout=10)) as w, following(w) as m:
        await use(w, "m")
        w.clock.advance(11)
        await w.reap_once()
        await caught_up(m, w)
        assert value(m, "sparkgate_idle_stops_total", model="m", action="stop") == 1
        assert states(m) == {"m": "stopped"}


async def test_follow_counts_events_emitted_before_it_started_once() -> None:
    async with waker_with(spec("m", 10)) as w:
        await use(w, "m")  # before any Metrics exists
        async with following(w) as m:
            await caught_up(m, w)
            assert value(m, "sparkgate_cold_starts_total", model="m") == 1


async def test_live_memory_sampler() -> None:
    async with waker_with(spec("a", 40), spec("b", 40)) as w:
        m = Metrics(w, live_memory=lambda: {"a": 12.5})
        assert value(m, "sparkgate_model_memory_live_gb", model="a") == 12.5
        assert value(m, "sparkgate_model_memory_live_gb", model="b") is None

        def broken() -> dict[str, float]:
            raise OSError("nvidia-smi went away")

        assert samples(Metrics(w, live_memory=broken), "sparkgate_model_memory_live_gb") == {}
        assert samples(Metrics(w, live_memory=lambda: None), "sparkgate_model_memory_live_gb") == {}


# -- pure event counting --------------------------------------------------------------------------------


def transition(model: str, source: str, target: str, **data: object) -> Event:
    return Event(0.0, model, "transition", source, target, "", dict(data))


async def test_on_event_sleep_wake_and_unknown_kinds() -> None:
    async with waker_with(spec("v", 10)) as w:
        m = Metrics(w)
        for event in (
            transition("v", "ready", "sleeping"),
            Event(0.0, "v", "idle_sleep"),
            transition("v", "sleeping", "waking"),
            transition("v", "waking", "ready", seconds=3.2),
            transition("v", "sleeping", "waking"),
            transition("v", "waking", "failed"),
            transition("ext", "stopped", "ready", url="http://x/v1"),  # external endpoint: nothing timed
            Event(0.0, "old", "stale_engine"),
            Event(0.0, "*", "reload"),  # kinds without a metric are only counted as events
        ):
            m.on_event(event)
        assert value(m, "sparkgate_wakes_total", model="v") == 2
        assert value(m, "sparkgate_idle_stops_total", model="v", action="sleep") == 1
        assert value(m, "sparkgate_wake_duration_seconds_count", model="v", kind="wake") == 1
        assert value(m, "sparkgate_wake_duration_seconds_sum", model="v", kind="wake") == 3.2
        assert value(m, "sparkgate_wake_duration_seconds_count", model="v", kind="start") is None
        assert value(m, "sparkgate_wake_duration_seconds_count", model="ext", kind="start") is None
        assert value(m, "sparkgate_start_failures_total", model="v") == 1  # a failed wake is a failed start
        assert value(m, "sparkgate_cold_starts_total", model="v") == 0
        assert value(m, "sparkgate_stale_engines_total", model="old") == 1
        assert value(m, "sparkgate_events_total", kind="reload") == 1
        assert value(m, "sparkgate_events_total", kind="transition") == 6


# -- requests ---------------------------------------------------------------------------------------------


async def test_request_counters_and_histograms() -> None:
    async with waker_with(spec("a", 10)) as w:
        m = Metrics(w)
        m.request_done("a", "laptop", "200", 0.5, 0.1)
        m.request_done("a", "laptop", "200", 1.5, 0.2)
        m.request_done("a", "laptop", "client_gone", 30.0, None)
        m.request_done("a", "webui", "503", 0.01, None)
        m.request_done("-", "anonymous", "400", 0.001, None)

        assert value(m, "sparkgate_requests_total", model="a", key="laptop", status="200") == 2
        assert value(m, "sparkgate_requests_total", model="a", key="laptop", status="client_gone") == 1
        assert value(m, "sparkgate_requests_total", model="a", key="webui", status="503") == 1
        assert value(m, "sparkgate_requests_total", model="-", key="anonymous", status="400") == 1
        assert value(m, "sparkgate_request_duration_seconds_count", model="a") == 4
        assert value(m, "sparkgate_request_duration_seconds_sum", model="a") == pytest.approx(32.01)
        assert value(m, "sparkgate_request_duration_seconds_bucket", model="a", le="1.0") == 2
        assert value(m, "sparkgate_time_to_first_byte_seconds_count", model="a") == 2  # None is not observed
        assert value(m, "sparkgate_time_to_first_byte_seconds_sum", model="a") == pytest.approx(0.3)
        assert value(m, "sparkgate_time_to_first_byte_seconds_count", model="-") == 0


async def test_each_metrics_object_has_its_own_registry() -> None:
    async with waker_with(spec("a", 10)) as w:
        first, second = Metrics(w), Metrics(w)
        first.request_done("a", "k", "200", 0.1, 0.05)
        assert value(first, "sparkgate_requests_total", model="a", key="k", status="200") == 1
        assert value(second, "sparkgate_requests_total", model="a", key="k", status="200") is None


# -- engine metrics ----------------------------------------------------------------------------------------

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="served"} 2.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="served"} 1234.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="served"} 1.7e+09
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0",model_name="served"} 3.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="served"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="served"} 5.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="served"} 7.5
# HELP odd_metric An engine metric with its own model label.
# TYPE odd_metric gauge
odd_metric{model="inner \\"quoted\\""} 1.0
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def engine_server() -> AsyncIterator[int]:
    """A vLLM-like /metrics page; /broken/metrics answers 404 like an engine without metrics."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=VLLM_PAGE, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", page)
    async with serve_app(app) as port:
        yield port


async def test_scrape_engines_relabels_every_ready_engine_over_http() -> None:
    async with engine_server() as port:
        specs = (
            external("one", f"http://127.0.0.1:{port}/v1"),
            external("two", f"http://127.0.0.1:{port}/v1", engine="sglang"),
            external("no-metrics", f"http://127.0.0.1:{port}/broken/v1"),  # 404
            external("down", f"http://127.0.0.1:{closed_port()}/v1"),  # connection refused
            external("hosted-api", f"http://127.0.0.1:{port}/v1", engine="generic"),  # not ours to poll
            spec("cold", 10),  # stopped: not scraped
        )
        async with waker_with(*specs) as w, aiohttp.ClientSession() as session:
            m = Metrics(w)
            body = await asyncio.wait_for(m.scrape_engines(session, timeout=2.0), 5)
    text = body.decode()

    # Valid exposition with one HELP and one TYPE per family, however many engines expose it.
    for kind in ("HELP", "TYPE"):
        names = re.findall(rf"^# {kind} (\S+)", text, flags=re.M)
        assert len(names) == len(set(names)), names
    assert "# TYPE vllm:prompt_tokens_total counter" in text
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text

    got = parse(text)
    for model in ("one", "two"):
        base = {"engine": "0", "model_name": "served", "model": model}
        assert got["vllm:num_requests_running"][("vllm:num_requests_running", tuple(sorted(base.items())))] == 2
        assert got["vllm:prompt_tokens"][("vllm:prompt_tokens_total", tuple(sorted(base.items())))] == 1234
        assert got["vllm:prompt_tokens_created"][("vllm:prompt_tokens_created", tuple(sorted(base.items())))] == 1.7e9
        inf = tuple(sorted({**base, "le": "+Inf"}.items()))
        assert got["vllm:e2e_request_latency_seconds"][("vllm:e2e_request_latency_seconds_bucket", inf)] == 5
        clash = tuple(sorted({"model": model, "exported_model": 'inner "quoted"'}.items()))
        assert got["odd_metric"][("odd_metric", clash)] == 1
    scraped = {dict(labels)["model"] for family in got.values() for (name, labels) in family
               if not name.startswith("sparkgate_")}
    assert scraped == {"one", "two"}

    success = {dict(labels)["model"]: v for (_, labels), v in got["sparkgate_engine_scrape_success"].items()}
    assert success == {"one": 1, "two": 1, "no-metrics": 0, "down": 0}
    assert set(dict(labels)["model"] for (_, labels) in got["sparkgate_engine_scrape_duration_seconds"]) == \
        {"one", "two", "no-metrics", "down"}


async def test_scrape_engines_with_nothing_ready_is_valid_and_empty() -> None:
    async with waker_with(spec("cold", 10)) as w, aiohttp.ClientSession() as session:
        body = await Metrics(w).scrape_engines(session)
    assert parse(body.decode()).get("sparkgate_engine_scrape_success", {}) == {}
