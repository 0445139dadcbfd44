"""Prometheus metrics for one gateway: requests, lifecycle events, live waker state, engine metrics.

Three sources, each read where it is cheapest and never where it could slow a request down:

* Requests: the proxy calls `Metrics.request_done` once per request. It is on the hot path, so the
  label children are resolved once and kept in small dicts (`Counter.labels` takes a lock and builds
  a tuple every call).
* Lifecycle: `Metrics.follow` consumes the waker's event log (`on_event` turns one event into counter
  increments). The events already carry every decision with its numbers, so the waker needs no
  metrics code of its own.
* State (model states, in-flight work, queues, budgets, memory): read from the waker at scrape time by
  a custom collector. Gauges that mirror state would need updating at every change and could drift;
  reading the state when Prometheus asks costs nothing in between and is always exact.

Everything lives on a `CollectorRegistry` owned by the `Metrics` object, never on prometheus_client's
global registry: one gateway per app, and tests build as many as they like side by side.

Engine metrics (vLLM `vllm:*`, SGLang `sglang:*`, ...) are scraped on demand by `scrape_engines` and
re-emitted with a `model` label, for a separate route: a slow engine never delays `/metrics`.
"""

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.registry import engine_for
from waker.events import Event
from waker.state import ModelState
from waker.waker import Waker

log = logging.getLogger("sparkgate.metrics")

S = ModelState
PREFIX = "sparkgate_"
UNRESOLVED = "-"
"""The `model` label of a request rejected before it named a known model (bad JSON, 401, 404...):
the name a client sent must never become a label value (unbounded series)."""

# Whole requests: from milliseconds (a warm short answer) to an hour (the default request_timeout; a
# cold start of a large model alone can take 15 minutes).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1200.0, 1800.0, 3600.0)
# Starts and wakes: a wake from sleep level 1 takes a fraction of a second; a cold start of a 120B model
# on a DGX Spark 10-15 minutes (30 minutes is the upper end of a sane start_timeout).
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0,
                 900.0, 1200.0, 1800.0)
# Waiting for room in the budget: 0 when the model fits at once, up to max_wait (10 minutes).
ADMISSION_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Engines that are known to expose a Prometheus /metrics route. Managed engines are tried whatever
# their kind (a failure costs one local request); an external endpoint of the generic kind may be a
# remote hosted API, which is not ours to poll.
_METRICS_ENGINES = frozenset({EngineKind.VLLM, EngineKind.SGLANG, EngineKind.TRTLLM, EngineKind.LLAMACPP})
_MAX_ENGINE_METRICS_BYTES = 16 * 1024 * 1024  # vLLM's page is ~100 KB; anything this big is not metrics


class Metrics:
    """Every metric of one gateway, on its own registry. Build one per app (see module docstring)."""

    def __init__(self, waker: Waker, live_memory: Callable[[], Mapping[str, float] | None] | None = None) -> None:
        """`live_memory`, read at scrape time: model name -> GiB its engine really uses now (the stats
        sampler's latest round); None (or returning None) leaves sparkgate_model_memory_live_gb empty."""
        self._waker = waker
        self.registry = CollectorRegistry()
        r = self.registry

        # -- requests (recorded by the proxy) --
        self.requests = Counter(f"{PREFIX}requests_total", "Requests through the proxy, by final status "
                                "(HTTP status, or client_gone when the client left before the end).",
                                ["model", "key", "status"], registry=r)
        self.request_duration = Histogram(f"{PREFIX}request_duration_seconds", "Whole proxied requests, "
                                          "including any wait for a cold start or for room.", ["model"],
                                          buckets=REQUEST_BUCKETS, registry=r)
        self.ttfb = Histogram(f"{PREFIX}time_to_first_byte_seconds", "From the request's arrival until the first "
                              "body byte from the engine reached the client.", ["model"], buckets=REQUEST_BUCKETS,
                              registry=r)
        # One dict lookup per request: (model, key, status) -> its counter and the model's two histograms.
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram, Histogram]] = {}

        # -- lifecycle (from waker events) --
        self.events_total = Counter(f"{PREFIX}events_total", "Waker events seen, by kind.", ["kind"], registry=r)
        self.cold_starts = Counter(f"{PREFIX}cold_starts_total", "Engine starts (stopped or failed -> starting; "
                                   "adopting a running engine at boot counts too, and so does the cold start that "
                                   "replaces a failed wake).", ["model"], registry=r)
        self.wakes = Counter(f"{PREFIX}wakes_total", "Wakes of sleeping engines (sleeping -> waking).", ["model"],
                             registry=r)
        self.wake_duration = Histogram(f"{PREFIX}wake_duration_seconds", "Time from starting (kind=start) or waking "
                                       "(kind=wake) until the engine was ready.", ["model", "kind"],
                                       buckets=START_BUCKETS, registry=r)
        self.evictions = Counter(f"{PREFIX}evictions_total", "Idle models stopped to make room for another.",
                                 ["model"], registry=r)
        self.idle_stops = Counter(f"{PREFIX}idle_stops_total", "Models stopped or put to sleep after idle_timeout.",
                                  ["model", "action"], registry=r)
        self.start_failures = Counter(f"{PREFIX}start_failures_total", "Starts or wakes that failed (starting or "
                                      "waking -> failed, or waking -> starting: a wake that failed and was replaced "
                                      "by a cold start).", ["model"], registry=r)
        self.crashes = Counter(f"{PREFIX}crashes_total", "Engines that failed after they were up (ready, sleeping "
                               "or stopping -> failed).", ["model"], registry=r)
        self.queued = Counter(f"{PREFIX}queued_total", "Times a model had to wait for room (a ticket queued).",
                              ["model"], registry=r)
        self.drains = Counter(f"{PREFIX}drains_total", "Busy models told to drain: others wait for their memory.",
                              ["model"], registry=r)
        self.admission_wait = Histogram(f"{PREFIX}admission_wait_seconds", "How long a model's requests waited for "
                                        "room before its start or wake was admitted (0 when it fit at once).",
                                        ["model"], buckets=ADMISSION_BUCKETS, registry=r)
        self.stale_engines = Counter(f"{PREFIX}stale_engines_total", "Engines left by an earlier gateway that were "
                                     "removed (spec changed or model gone).", ["model"], registry=r)
        self.background_tasks = Counter(f"{PREFIX}background_tasks_total", "Background tasks (titles, tags...) the "
                                        "model they named could not take at once: routed to the task model, or "
                                        "refused with a 503 (gateway/tasks.py).", ["model", "outcome"], registry=r)
        # Zero series for every configured model, so rate() and increase() work from the first scrape.
        for spec in waker.registry.values():
            if spec.manages_lifecycle:
                for counter in (self.cold_starts, self.evictions, self.start_failures, self.crashes, self.queued):
                    counter.labels(spec.name)

        self._live_memory = live_memory
        self._followed = False
        r.register(_WakerCollector(waker, self._read_live_memory))

    # -- requests --------------------------------------------------------------------------------

    def request_done(self, model: str, key: str, status: str, duration: float, ttfb: float | None) -> None:
        """Record one finished request. `model` is the canonical model name (or UNRESOLVED), `key` the
        API key's *name* (never the key), `status` the HTTP status as a string or "client_gone";
        `ttfb` is None when no engine byte reached the client."""
        children = self._request_children.get((model, key, status))
        if children is None:
            children = self._request_children[(model, key, status)] = (
                self.requests.labels(model, key, status), self.request_duration.labels(model), self.ttfb.labels(model))
        children[0].inc()
        children[1].observe(duration)
        if ttfb is not None:
            children[2].observe(ttfb)

    # -- lifecycle ---------------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Count one waker event. No I/O and no waker access: tests feed it events directly."""
        self.events_total.labels(event.kind).inc()
        model, kind = event.model, event.kind
        if kind == "transition":
            source, target = event.source, event.target
            if target == S.STARTING and source in (S.STOPPED, S.FAILED, S.WAKING):
                self.cold_starts.labels(model).inc()
                if source == S.WAKING:
                    self.start_failures.labels(model).inc()  # the wake failed; the cold start is counted on its own
            elif target == S.WAKING and source == S.SLEEPING:
                self.wakes.labels(model).inc()
            elif target == S.READY and source in (S.STARTING, S.WAKING):
                seconds = event.data.get("seconds")
                if isinstance(seconds, int | float):
                    self.wake_duration.labels(model, "start" if source == S.STARTING else "wake").observe(seconds)
            elif target == S.FAILED:
                # A start that never came up and an engine that died while serving are different problems
                # (bad config / OOM at load vs. a crash under load): they get different counters.
                if source in (S.STARTING, S.WAKING):
                    self.start_failures.labels(model).inc()
                else:
                    self.crashes.labels(model).inc()
        elif kind == "evict":
            self.evictions.labels(model).inc()
        elif kind == "idle_stop":
            self.idle_stops.labels(model, "stop").inc()
        elif kind == "idle_sleep":
            self.idle_stops.labels(model, "sleep").inc()
        elif kind == "queued":
            self.queued.labels(model).inc()
        elif kind == "drain":
            self.drains.labels(model).inc()
        elif kind == "admit":
            waited = event.data.get("waited_s")
            if isinstance(waited, int | float):
                self.admission_wait.labels(model).observe(waited)
        elif kind == "stale_engine":
            self.stale_engines.labels(model).inc()
        elif kind == "task_routed":
            self.background_tasks.labels(model, "routed").inc()
        elif kind == "task_refused":
            self.background_tasks.labels(model, "refused").inc()

    async def follow(self) -> None:
        """Count the waker's events forever (run it as a task; cancel it at shutdown).

        The first call also counts the events already in the log's ring, so the task may start before or
        after the waker: boot-time events (adoption, preload, external endpoints) are not lost. Reading
        the ring and subscribing happen with no await in between, so no event is missed or counted twice.
        """
        events = self._waker.events
        backlog = [] if self._followed else events.recent()
        self._followed = True
        for event in backlog:
            self._count(event)
        async for event in events.subscribe():
            self._count(event)

    def _count(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:  # a metrics bug must never stop the counting of later events
            log.exception("metrics: could not count event %s", event.kind)

    def _read_live_memory(self) -> Mapping[str, float] | None:
        if self._live_memory is None:
            return None
        try:
            return self._live_memory()
        except Exception:  # a broken sampler must not break /metrics: the series are left out
            log.exception("metrics: live memory sampler failed")
            return None

    # -- exposition --------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and content type for `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def scrape_engines(self, session: aiohttp.ClientSession, timeout: float = 2.0,
                             max_bytes: int = _MAX_ENGINE_METRICS_BYTES) -> bytes:
        """Every READY engine's own `/metrics`, merged, each sample labelled `model="<name>"`.

        Engines are asked concurrently, each bounded by `timeout`; one that fails, answers non-200, sends
        a page over `max_bytes` or something unparsable is left out (and shows as
        `sparkgate_engine_scrape_success 0`).
        Parsing runs in a thread: a big vLLM page takes milliseconds of pure Python, which would
        otherwise stall the proxy's event loop.
        """
        targets = list(self._scrape_targets())
        fetched = await asyncio.gather(*(_fetch(session, name, url, spec, timeout, max_bytes)
                                         for name, url, spec in targets))
        return await asyncio.to_thread(_relabel, fetched)

    def _scrape_targets(self) -> Iterator[tuple[str, str, ModelSpec]]:
        for status in self._waker.describe().models:
            spec = status.spec
            if status.state is not S.READY or status.engine is None:
                continue
            if not spec.manages_lifecycle and spec.engine not in _METRICS_ENGINES:
                continue
            path = engine_for(spec.engine).metrics_path
            if path is not None:
                yield status.name, status.engine.root_url + path, spec


# -- scrape-time state -----------------------------------------------------------------------------


class _WakerCollector(Collector):
    """Reads the waker's state when Prometheus scrapes (see module docstring for why not gauges)."""

    def __init__(self, waker: Waker, live_memory: Callable[[], Mapping[str, float] | None]) -> None:
        self._waker = waker
        self._live_memory = live_memory

    def describe(self) -> list[Metric]:
        # Nothing to check against other collectors' names; and collect() must not run at register time
        # (the waker has not started then).
        return []

    def collect(self) -> Iterable[Metric]:
        described = self._waker.describe()

        state = GaugeMetricFamily(f"{PREFIX}model_state", "1 for the state each model is in, 0 for the others.",
                                  labels=["model", "state"])
        in_flight = GaugeMetricFamily(f"{PREFIX}model_in_flight", "Requests being served by the model now.",
                                      labels=["model"])
        waiting = GaugeMetricFamily(f"{PREFIX}model_waiting", "Requests waiting for the model to be ready "
                                    "(starting, waking, or queued for room).", labels=["model"])
        queue_model = GaugeMetricFamily(f"{PREFIX}queue_depth_model", "Requests queued for room in the budget, "
                                        "by model.", labels=["model"])
        declared = GaugeMetricFamily(f"{PREFIX}model_memory_declared_gb", "memory_gb from models.d (GiB).",
                                     labels=["model"])
        for status in described.models:
            name = status.name
            for value in ModelState:
                state.add_metric([name, value.value], 1.0 if status.state is value else 0.0)
            in_flight.add_metric([name], status.in_flight)
            waiting.add_metric([name], status.waiting)
            declared.add_metric([name], status.spec.memory_gb)
            if status.managed:
                queue_model.add_metric([name], status.queued)
        yield from (state, in_flight, waiting, queue_model, declared)

        live = GaugeMetricFamily(f"{PREFIX}model_memory_live_gb", "Memory the model's engine really uses (GiB), "
                                 "as sampled.", labels=["model"])
        sampled = self._live_memory()
        if sampled is not None:
            for name, gb in sorted(sampled.items()):
                live.add_metric([name], gb)
        yield live

        queue = GaugeMetricFamily(f"{PREFIX}queue_depth", "Requests queued for room in the node's budget.",
                                  labels=["node"])
        used = GaugeMetricFamily(f"{PREFIX}budget_used_gb", "Memory held by models in the node's ledger (GiB).",
                                 labels=["node"])
        total = GaugeMetricFamily(f"{PREFIX}budget_total_gb", "The node's budget: total_gb - reserve_gb (GiB).",
                                  labels=["node"])
        high = GaugeMetricFamily(f"{PREFIX}budget_high_water_gb", "Most memory the ledger ever held on the node "
                                 "(GiB).", labels=["node"])
        free = GaugeMetricFamily(f"{PREFIX}live_free_gb", "Free memory the node's probe reads now (GiB); absent "
                                 "when it can't tell.", labels=["node"])
        for node in described.nodes:
            queue.add_metric([node.name], node.queued)
            used.add_metric([node.name], node.held_gb)
            total.add_metric([node.name], node.capacity_gb)
            high.add_metric([node.name], node.high_water_gb)
            if node.live_free_gb is not None:
                free.add_metric([node.name], node.live_free_gb)
        yield from (queue, used, total, high, free)


# -- engine metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Fetched:
    model: str
    text: str | None  # None: the scrape failed
    seconds: float


async def _fetch(session: aiohttp.ClientSession, model: str, url: str, spec: ModelSpec,
                 timeout: float, max_bytes: int) -> _Fetched:
    started = time.monotonic()
    # Identity encoding: the app's upstream session passes bytes through without decompressing them.
    headers = {"Accept": "text/plain", "Accept-Encoding": "identity"}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    text: str | None = None
    try:
        async with session.get(url, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status == 200:
                body = await _read_whole(resp, max_bytes)
                if body is None:
                    log.debug("metrics: %s sent a /metrics page over %d bytes", model, max_bytes)
                else:
                    text = body.decode("utf-8", errors="replace")
            else:
                log.debug("metrics: %s answered %s on /metrics", model, resp.status)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        log.debug("metrics: could not scrape %s: %r", model, exc)
    return _Fetched(model, text, time.monotonic() - started)


async def _read_whole(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body up to EOF, or None when it is over `limit` bytes. (`content.read(n)` returns only
    what is buffered: a 220 KB page came back as 128 KB and passed for a whole one;
    test_engine_metrics_page_is_read_whole_and_one_over_the_limit_fails.)"""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class _Families(Collector):
    """A throwaway collector for generate_latest: the merged engine families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _relabel(fetched: list[_Fetched]) -> bytes:
    """Merge the engines' pages into one exposition: one HELP/TYPE per family whatever the number of
    engines that expose it, every sample labelled with its model. An engine's own `model` label is kept
    as `exported_model` (Prometheus' convention for a clash)."""
    merged: dict[str, Metric] = {}
    success = GaugeMetricFamily(f"{PREFIX}engine_scrape_success", "1 if the engine's /metrics was read and "
                                "parsed on this scrape, else 0.", labels=["model"])
    took = GaugeMetricFamily(f"{PREFIX}engine_scrape_duration_seconds", "How long reading the engine's "
                             "/metrics took.", labels=["model"])
    for item in fetched:
        took.add_metric([item.model], item.seconds)
        families: list[Metric] = []
        if item.text is not None:
            try:
                families = list(text_string_to_metric_families(item.text))
            except Exception as exc:  # the parser raises bare ValueError/IndexError on bad input
                log.debug("metrics: unparsable /metrics from %s: %r", item.model, exc)
                success.add_metric([item.model], 0.0)
                continue
        success.add_metric([item.model], 1.0 if item.text is not None else 0.0)
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            elif target.type != family.type:
                log.debug("metrics: %s: %s is a %s here but a %s elsewhere; left out", item.model, family.name,
                          family.type, target.type)
                continue
            target.samples.extend(_with_model(sample, item.model) for sample in family.samples)
    return generate_latest(_Families([*merged.values(), success, took]))


def _with_model(sample: Sample, model: str) -> Sample:
    labels = dict(sample.labels)
    if "model" in labels:
        labels["exported_model"] = labels.pop("model")
    labels["model"] = model
    return sample._replace(labels=labels)


__all__ = ["PREFIX", "UNRESOLVED", "Metrics"]
