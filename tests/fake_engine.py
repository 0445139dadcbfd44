"""A small OpenAI-compatible engine for tests that must force timing and failures.

Behaves like the real servers where it matters: `/health` (503 until ready), `/v1/models`,
chat and text completions with SSE framing (`data: {...}\\n\\n`, then `data: [DONE]`), embeddings.
Counts what happened at `GET /stats`, including streams the client abandoned.

    python tests/fake_engine.py --port P --model NAME [--ready-after S] [--never-ready]
        [--exit-at-start CODE] [--token-delay S] [--no-done] [--crash-after-tokens N] [--alloc-mb N]
        [--hang-requests] [--hang-health]

The other OpenAI-style endpoints (audio transcriptions, translations and speech, images, rerank, score) and
Anthropic's /v1/messages answer in the shapes of the servers that serve them, cited at `add_openai_endpoints`;
the files of every form are hashed as they arrive and listed at /stats ("uploads").

OpenAI request options it honours (each only when the request asks for it, so older tests see the
same bytes): `stream_options: {"include_usage": true}` (every chunk carries `"usage": null`, and a
last chunk with empty `choices` and the usage comes before `data: [DONE]`, as OpenAI sends it);
`tools` in chat requests (when the last message is the user's and names one of the tools' functions,
the answer is a call of that function: streamed as `tool_calls` deltas, the arguments in fragments,
finish_reason "tool_calls"); `suffix` on /v1/completions (fill-in-the-middle; counted in /stats as
`fim_requests`). `--created T` fixes the `created` timestamp, so two answers are byte-identical.

--hang-requests: completion requests are read in full, then never answered (health stays OK), like an
engine whose scheduler is wedged. --hang-health: the readiness routes (/health, /v1/models) accept
the connection and the request, then never answer, like an engine stuck in a blocking load.

--flavor {generic,vllm,sglang,llamacpp,trtllm} (default generic: the behaviour above, unchanged) makes the
fake behave like that engine wherever the gateway depends on it: readiness (connection refused, 503 bodies,
SGLang's generating /health), the sleep routes and their exact answers, weights lost by a sleep and what a
woken engine then answers, vLLM's --shutdown-timeout. Each flavoured behaviour cites the upstream file it
copies; /work/notes/issue14-upstream-facts.md has the commits. The real output of a completion stays the
request's function (" t0 t1 ..."); an engine whose weights are garbage answers "!" tokens instead, with 200.

    vllm:     python tests/fake_engine.py --flavor vllm [MODEL] --port P --served-model-name NAME
                  [--enable-sleep-mode] [--shutdown-timeout S] [--gpu-memory-utilization F] [--ready-after S]
              (dev routes need env VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode)
    sglang:   python tests/fake_engine.py --flavor sglang --model-path PATH --port P [--served-model-name NAME]
                  [--mem-fraction-static F] [--enable-memory-saver] [--enable-weights-cpu-backup]
                  [--listen-after S] [--ready-after S]   (env SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0: fast /health)
    llamacpp: python tests/fake_engine.py --flavor llamacpp --port P --model PATH [--alias NAME] [--ready-after S]
    trtllm:   python tests/fake_engine.py --flavor trtllm MODEL --port P [--served_model_name NAME]
                  [--kv_cache_free_gpu_memory_fraction F] [--ready-after S]

/stats adds, for a flavour (generic's /stats keeps its fields): flavor, in_flight, garbage_answers,
queued_while_asleep, aborted, rejected_draining, health_generations and the engine's memory state (vllm:
is_sleeping, asleep_tags, weights_valid; sglang: released, weights_valid). /sleep_log lists the calls in
order: "sleep level=N[ mode=M]", "wake_up[ tags=a,b]", "collective_rpc METHOD", "reset_prefix_cache",
"flush_cache", "release_memory_occupation[ tags=a,b]", "resume_memory_occupation[ tags=a,b]",
"update_weights_from_disk model_path=P". A flavour also has some of its engine's own routes beyond /v1
(`add_engine_routes`: vLLM's /tokenize, llama.cpp's /props and POST /slots/{id}, SGLang's /get_server_info...);
/route_log lists each call to them in order, "METHOD /path?query".
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web

STATS = {"requests": 0, "streams_started": 0, "streams_completed": 0, "streams_cancelled": 0, "hung": 0,
         "fim_requests": 0, "tool_calls": 0}
# vLLM sleep mode, as documented (https://docs.vllm.ai/en/latest/features/sleep_mode/): routes exist
# only with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1; POST /sleep?level=1|2, POST /wake_up
# (optionally ?tags=weights / ?tags=kv_cache), POST /collective_rpc {"method": "reload_weights"},
# GET /is_sleeping. Every call is recorded in SLEEP_LOG for tests to check the sequence.
SLEEP = {"level": 0, "weights": True, "kv_cache": True}
SLEEP_LOG: list[str] = []

FLAVORS = ("generic", "vllm", "sglang", "llamacpp", "trtllm")
# Counters only a flavoured fake reports (empty for generic, whose /stats stays byte-identical).
EXTRA_STATS: dict[str, int] = {}
# Completion handlers in progress, and those of them still queued behind a paused vLLM scheduler.
RUNNING: set[asyncio.Task] = set()
QUEUED: set[asyncio.Task] = set()
GARBAGE_TOKEN = "!"  # what a model with garbage weights says, token after token (vLLM #29341: "!!!!...")


CREATED: int | None = None  # --created: a fixed timestamp instead of the clock's


def created() -> int:
    return CREATED if CREATED is not None else int(time.time())


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def chunk(model: str, text: str, finish: str | None, kind: str, usage: bool = False) -> bytes:
    if kind == "chat":
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        obj = "text_completion"
    event = {"id": "fake-1", "object": obj, "created": created(), "model": model, "choices": [choice]}
    if usage:
        event["usage"] = None  # OpenAI: with include_usage every chunk has the field, null until the last
    return sse(event)


def tool_call_chunk(model: str, delta: dict, finish: str | None, usage: bool) -> bytes:
    event = {"id": "fake-1", "object": "chat.completion.chunk", "created": created(), "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        event["usage"] = None
    return sse(event)


def usage_chunk(model: str, kind: str, completion_tokens: int) -> bytes:
    """The last chunk OpenAI sends with stream_options.include_usage: no choices, only the usage."""
    return sse({"id": "fake-1", "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": created(), "model": model, "choices": [],
                "usage": {"prompt_tokens": 4, "completion_tokens": completion_tokens,
                          "total_tokens": 4 + completion_tokens}})


def requested_tool(body: dict) -> dict | None:
    """The function the request's last (user) message names, among its `tools`; None otherwise."""
    tools = body.get("tools")
    messages = body.get("messages")
    if not isinstance(tools, list) or not tools or not isinstance(messages, list) or not messages:
        return None
    if body.get("tool_choice") == "none":
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user" or not isinstance(last.get("content"), str):
        return None
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"] in last["content"]:
            return function
    return None


def tool_arguments(function: dict) -> str:
    """Arguments for a call: every declared parameter gets the value "fake-<name>"."""
    properties = (function.get("parameters") or {}).get("properties") or {}
    return json.dumps({name: f"fake-{name}" for name in properties})


class VllmState:
    """vLLM's scheduler and memory as its sleep routes change them.

    vllm/v1/engine/core.py (EngineCore.sleep, pause_scheduler, wake_up, is_sleeping): a sleep first pauses the
    scheduler -- new requests are still accepted, and queued ("All pause modes queue new adds"); in-flight ones
    are aborted (mode=abort, the default), drained (wait) or frozen (keep) -- then frees memory by tag. A wake
    resumes scheduling only once no tag is asleep any more, and is_sleeping is true until then.
    """

    def __init__(self) -> None:
        self.admitting = asyncio.Event()  # cleared: new requests wait in the queue
        self.stepping = asyncio.Event()  # cleared: requests in flight make no progress (mode=keep)
        self.admitting.set()
        self.stepping.set()
        self.asleep_tags: set[str] = set()
        self.level = 0
        self.weights_valid = True  # False after a level 2 sleep, until collective_rpc reload_weights
        self.draining = False  # SIGTERM received: new requests are refused

    def is_sleeping(self) -> bool:
        return bool(self.asleep_tags) or not self.admitting.is_set()


class SglangState:
    """SGLang's memory regions, as python/sglang/srt/managers/scheduler_update_weights_mixin.py keeps them."""

    ALL_TAGS = ("weights", "kv_cache", "cuda_graph")  # python/sglang/srt/constants.py GPU_MEMORY_ALL_TYPES

    def __init__(self) -> None:
        self.released: set[str] = set()  # the scheduler's offload_tags
        self.weights_valid = True  # False once weights were released without a CPU backup, until reloaded


def in_flight() -> set[asyncio.Task]:
    """Completions the engine is working on (not those queued behind a paused scheduler)."""
    return RUNNING - QUEUED


def env_flag(name: str, default: bool) -> bool:
    """An environment boolean read the way SGLang's EnvBool reads it (python/sglang/srt/environ.py)."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "n", "f", "")


def scheduler_crash(error: str) -> None:
    """SGLang's answer to an exception in its scheduler: the whole server dies, the HTTP call gets no answer.

    run_scheduler_process (python/sglang/srt/managers/scheduler.py) logs "Scheduler hit an exception" and sends
    SIGQUIT to its parent, whose handler (tokenizer_manager.py) logs the line below and kill_process_tree()s
    itself: SIGKILL.
    """
    print(f"Scheduler hit an exception: Traceback (most recent call last):\n{error}", file=sys.stderr, flush=True)
    print("SIGQUIT received. signum=None, frame=None. It usually means one child failed.", file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def make_app(args: argparse.Namespace, boot: tuple[float, float] | None = None,
             vllm: "VllmState | None" = None) -> web.Application:
    # boot: when the process started (monotonic, wall clock), for flavours that load before they listen;
    # vllm: the vLLM flavour's state, which serve_vllm() marks as draining on SIGTERM.
    started, started_wall = boot if boot is not None else (time.monotonic(), time.time())
    # When /health turns 200, on the wall clock: every answer says it (bench/wake.py measures what a cold
    # request waits beyond this moment).
    ready_at = f"{started_wall + args.ready_after:.6f}"
    flavor = args.flavor
    vllm = vllm if vllm is not None else VllmState()
    sglang = SglangState()

    def ready() -> bool:
        return not args.never_ready and time.monotonic() - started >= args.ready_after

    async def hang(request: web.Request) -> web.Response:
        await request.read()  # the request is read in full: only the answer never comes
        STATS["hung"] += 1
        print(f"hanging {request.method} {request.path}", flush=True)
        await asyncio.Event().wait()  # until the client gives up (or the process ends)
        raise AssertionError("unreachable")

    def llamacpp_loading() -> web.Response:
        # tools/server/server.cpp (middleware_server_state): while SERVER_STATE_LOADING_MODEL every route but
        # /models, /v1/models, /api/tags and the HTML pages gets format_error_response("Loading model",
        # ERROR_TYPE_UNAVAILABLE) (tools/server/server-common.cpp): this body, 503.
        return web.json_response({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                                 status=503)

    async def health(request: web.Request) -> web.Response:
        if args.hang_health:
            return await hang(request)
        if flavor in ("vllm", "trtllm"):
            # vllm/entrypoints/serve/instrumentator/health.py: 200 (no body) once it listens, asleep or not;
            # tensorrt_llm/serve/openai_server.py (health): the same. Neither listens before it is loaded.
            return web.Response(status=200)
        if flavor == "llamacpp":
            return web.json_response({"status": "ok"}) if ready() else llamacpp_loading()
        if flavor == "sglang":
            return await sglang_health(request)
        return web.json_response({"status": "ok"} if ready() else {"status": "loading"}, status=200 if ready() else 503)

    async def sglang_health(request: web.Request) -> web.Response:
        """python/sglang/srt/entrypoints/http_server.py (health_generate, the handler of /health too)."""
        if not ready():
            return web.Response(status=503)  # ServerStatus.Starting: until the warmup request has ended
        if request.path == "/health" and not env_flag("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", True):
            return web.Response(status=200)
        # A one-token generation; the handler polls for its reply with `await asyncio.sleep(1)`, so a probe
        # takes at least a second.
        EXTRA_STATS["health_generations"] += 1
        await asyncio.sleep(1.0)
        if args.enable_memory_saver and sglang.released:
            # Unverified upstream: a generation against released memory. Upstream waits up to
            # SGLANG_HEALTH_CHECK_TIMEOUT (20 s) for a reply, then answers 503; the fake answers 503 at once.
            return web.Response(status=503)
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        if args.hang_health:
            return await hang(request)
        if flavor != "generic":
            # llama.cpp lets /v1/models through while loading (tools/server/server.cpp middleware_server_state);
            # SGLang answers it during warmup; vLLM and trtllm only listen once loaded.
            return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})
        if not ready():
            return web.json_response({"error": {"message": "loading"}}, status=503)
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    def state() -> dict[str, object]:
        if flavor == "vllm":
            return {"is_sleeping": vllm.is_sleeping(), "asleep_tags": sorted(vllm.asleep_tags),
                    "weights_valid": vllm.weights_valid}
        if flavor == "sglang":
            return {"released": sorted(sglang.released), "weights_valid": sglang.weights_valid}
        return {}

    async def stats(request: web.Request) -> web.Response:
        uploads = {"uploads": UPLOADS} if UPLOADS else {}  # only once a form came: generic's fields stay as they were
        if flavor == "generic":
            return web.json_response({**STATS, "pid": os.getpid(), **uploads})
        return web.json_response({**STATS, "flavor": flavor, **EXTRA_STATS, "in_flight": len(in_flight()), **state(),
                                  "pid": os.getpid(), **uploads})

    def weights_valid() -> bool:
        if flavor == "vllm":
            return vllm.weights_valid
        if flavor == "sglang":
            return sglang.weights_valid
        return True

    async def admit(request: web.Request) -> web.Response | None:
        """A flavour's say on a completion before it runs: an answer that refuses it, or None (after waiting)."""
        if flavor == "llamacpp" and not ready():
            return llamacpp_loading()
        if flavor == "sglang" and args.enable_memory_saver and sglang.released:
            # Unverified upstream: SGLang has no guard for a generation while memory is released (the pages are
            # unmapped). The fake refuses it, as an engine that cannot serve would.
            return web.json_response({"error": {"message": "memory released: "
                                                + ",".join(sorted(sglang.released)), "code": 503}}, status=503)
        if flavor == "vllm":
            if vllm.draining:
                # PR #36666 (--shutdown-timeout): after SIGTERM the API server rejects new requests.
                EXTRA_STATS["rejected_draining"] += 1
                return web.json_response({"error": {"message": "server is shutting down", "code": 503}}, status=503)
            if not vllm.admitting.is_set():
                # vllm/v1/engine/core.py (pause_scheduler): a paused (sleeping) engine queues new requests; they
                # run once a wake has resumed the scheduler. No 503.
                EXTRA_STATS["queued_while_asleep"] += 1
                task = asyncio.current_task()
                assert task is not None
                QUEUED.add(task)
                try:
                    await vllm.admitting.wait()
                finally:
                    QUEUED.discard(task)
        return None

    async def completions(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        RUNNING.add(task)  # what a vLLM sleep aborts or waits for, what an SGLang release asserts is empty
        try:
            return await complete(request)
        finally:
            RUNNING.discard(task)

    async def complete(request: web.Request) -> web.StreamResponse:
        STATS["requests"] += 1
        if flavor == "generic":
            if asleep() or SLEEP["level"] == 2:  # level 2 without reload_weights: weights are garbage
                return web.json_response({"error": {"message": "engine is sleeping", "code": "sleeping"}},
                                         status=503)
        else:
            refusal = await admit(request)
            if refusal is not None:
                return refusal
        if args.hang_requests:
            return await hang(request)
        kind = "chat" if request.path.endswith("chat/completions") else "text"
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400)
        if body.get("model") != args.model:
            return web.json_response(
                {"error": {"message": f"model {body.get('model')!r} not served here", "code": "model_not_found"}},
                status=404,
            )
        # Garbage weights answer 200 with garbage, silently: vLLM #29341 (level 2 wake without reload_weights);
        # SGLang weights released without --enable-weights-cpu-backup (model_runner.py: memory_saver region
        # enable_cpu_backup=server_args.enable_weights_cpu_backup).
        garbage = not weights_valid()
        if garbage:
            EXTRA_STATS["garbage_answers"] += 1

        def token(i: int) -> str:
            return GARBAGE_TOKEN if garbage else f" t{i}"

        tokens = int(body.get("max_tokens") or 8)
        if kind == "text" and body.get("suffix") is not None:
            STATS["fim_requests"] += 1
        tool = requested_tool(body) if kind == "chat" else None
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        if tool is not None and not body.get("stream"):
            STATS["tool_calls"] += 1
            call = {"id": "call_fake_1", "type": "function",
                    "function": {"name": tool["name"], "arguments": tool_arguments(tool)}}
            return web.json_response({
                "id": "fake-1", "object": "chat.completion", "created": created(), "model": args.model,
                "choices": [{"index": 0, "finish_reason": "tool_calls",
                             "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
            })
        if not body.get("stream"):
            if args.token_delay:
                await asyncio.sleep(args.token_delay * tokens)
            if flavor == "vllm":
                await vllm.stepping.wait()  # mode=keep froze it: it finishes after the wake
            text = "".join(token(i) for i in range(tokens))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if kind == "chat" else {"index": 0, "text": text, "finish_reason": "length"})
            return web.json_response({
                "id": "fake-1", "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": created(), "model": args.model, "choices": [choice],
                "usage": {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens},
            })
        STATS["streams_started"] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await resp.prepare(request)  # inside: a client gone already counts as a cancelled stream
            if tool is not None:
                STATS["tool_calls"] += 1
                sent = await stream_tool_call(resp, tool, include_usage)
            else:
                for i in range(tokens):
                    if args.crash_after_tokens is not None and i == args.crash_after_tokens:
                        os._exit(137)
                    if flavor == "vllm":
                        await vllm.stepping.wait()
                    finish = "length" if i == tokens - 1 else None
                    await resp.write(chunk(args.model, token(i), finish, kind, include_usage))
                    await asyncio.sleep(args.token_delay)
                sent = tokens
            if include_usage:
                await resp.write(usage_chunk(args.model, kind, sent))
            if not args.no_done:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            STATS["streams_cancelled"] += 1
            raise
        STATS["streams_completed"] += 1
        return resp

    async def stream_tool_call(resp: web.StreamResponse, tool: dict, usage: bool) -> int:
        """A function call as OpenAI streams it: id, type and name first, then the arguments in pieces."""
        arguments = tool_arguments(tool)
        pieces = [arguments[i:i + 8] for i in range(0, len(arguments), 8)]
        first = {"index": 0, "id": "call_fake_1", "type": "function",
                 "function": {"name": tool["name"], "arguments": ""}}
        await resp.write(tool_call_chunk(args.model, {"role": "assistant", "content": None, "tool_calls": [first]},
                                         None, usage))
        for piece in pieces:
            await asyncio.sleep(args.token_delay)
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            await resp.write(tool_call_chunk(args.model, delta, None, usage))
        await resp.write(tool_call_chunk(args.model, {}, "tool_calls", usage))
        return len(pieces) + 2

    def asleep() -> bool:
        return not (SLEEP["weights"] and SLEEP["kv_cache"])

    async def sleep(request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))
        SLEEP_LOG.append(f"sleep level={level}")
        SLEEP.update(level=level, weights=False, kv_cache=False)
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        tags = request.query.getall("tags", ["weights", "kv_cache"])
        SLEEP_LOG.append("wake_up" + (f" tags={','.join(tags)}" if "tags" in request.query else ""))
        for tag in tags:
            SLEEP[tag] = True
        return web.Response(status=200)

    async def collective_rpc(request: web.Request) -> web.Response:
        body = await request.json()
        SLEEP_LOG.append(f"collective_rpc {body.get('method')}")
        if body.get("method") == "reload_weights":
            SLEEP["level"] = 0
        return web.json_response({"results": [None]})

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": asleep()})

    # vLLM's dev routes, flavoured. vllm/entrypoints/serve/sleep/api_router.py (sleep, wake_up, is_sleeping),
    # vllm/entrypoints/serve/dev/rpc/api_router.py (collective_rpc), .../dev/cache/api_router.py
    # (reset_prefix_cache); the engine side is vllm/v1/engine/core.py (EngineCore.sleep, wake_up).

    async def vllm_sleep(request: web.Request) -> web.Response:
        level = int(request.query.get("level", "1"))  # query only; a JSON body is ignored
        mode = request.query.get("mode", "abort")
        SLEEP_LOG.append(f"sleep level={level}" + (f" mode={mode}" if "mode" in request.query else ""))
        if mode not in ("abort", "wait", "keep"):
            # pause_scheduler raises ValueError(f"Invalid pause mode: {mode}"): a server error
            return web.json_response({"error": {"message": f"Invalid pause mode: {mode}", "code": 500}}, status=500)
        vllm.admitting.clear()  # every mode queues new requests from now on
        if mode == "abort":
            running = in_flight()
            EXTRA_STATS["aborted"] += len(running)
            for task in running:
                task.cancel()
        elif mode == "wait":
            while in_flight():  # they keep running until done; the sleep answers after
                await asyncio.sleep(0.01)
        else:
            vllm.stepping.clear()  # keep: frozen in place, resumed by the wake
        if level >= 1:
            # Level 1 copies the weights to host memory and discards the KV cache; level 2 discards both.
            vllm.asleep_tags |= {"weights", "kv_cache"}
            vllm.level = level
            if level >= 2:
                vllm.weights_valid = False
        return web.Response(status=200)

    async def vllm_wake_up(request: web.Request) -> web.Response:
        tags = request.query.getall("tags", [])
        SLEEP_LOG.append("wake_up" + (f" tags={','.join(tags)}" if tags else ""))
        # No tags: wake everything. "scheduling" only resumes the scheduler (a level 0 sleep).
        woken = {tag for tag in tags if tag != "scheduling"} if tags else set(vllm.asleep_tags)
        vllm.asleep_tags -= woken
        # The weights come back from the host copy after level 1; after level 2 their memory comes back with
        # whatever it holds, until collective_rpc reload_weights.
        if not vllm.asleep_tags:  # resume only once fully awake (EngineCore.wake_up)
            vllm.admitting.set()
            vllm.stepping.set()
        return web.Response(status=200)

    async def vllm_collective_rpc(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as e:
            return web.json_response({"detail": f"JSON decode error: {e}"}, status=400)
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return web.json_response({"detail": "Missing 'method' in request body"}, status=400)
        SLEEP_LOG.append(f"collective_rpc {method}")
        if method == "reload_weights":
            vllm.weights_valid = True
        return web.json_response({"results": [None]})  # one None per worker

    async def vllm_is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": vllm.is_sleeping()})

    async def vllm_reset_prefix_cache(request: web.Request) -> web.Response:
        SLEEP_LOG.append("reset_prefix_cache")
        return web.Response(status=200)

    # SGLang's memory routes: python/sglang/srt/entrypoints/http_server.py (release_memory_occupation,
    # resume_memory_occupation, update_weights_from_disk), the scheduler side in
    # python/sglang/srt/managers/scheduler_update_weights_mixin.py.

    def sglang_invalid(message: str) -> web.Response:
        # http_server.py (validation_exception_handler): FastAPI's 422 turned into 400 with an ErrorResponse.
        return web.json_response({"object": "error", "message": message, "type": "Bad Request", "param": None,
                                  "code": 400}, status=400)

    async def sglang_body(request: web.Request) -> dict | web.Response:
        raw = await request.read()
        if not raw:  # the body is a required parameter: no body fails validation (inferred from FastAPI)
            return sglang_invalid("[{'type': 'missing', 'loc': ('body',), 'msg': 'Field required'}]")
        try:
            body = json.loads(raw)
        except ValueError as e:
            return sglang_invalid(f"JSON decode error: {e}")
        if not isinstance(body, dict):
            return sglang_invalid("the body must be a JSON object")
        return body

    async def sglang_tags(request: web.Request) -> list[str] | web.Response | None:
        """The `tags` of a release or resume request (None: all), or the 400 SGLang answers a bad body with."""
        body = await sglang_body(request)
        if isinstance(body, web.Response):
            return body
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            return sglang_invalid("tags must be a list of strings or null")
        return tags

    def tags_suffix(tags: list[str] | None) -> str:
        return f" tags={','.join(tags)}" if tags else ""

    async def sglang_release(request: web.Request) -> web.Response:
        tags = await sglang_tags(request)
        if isinstance(tags, web.Response):
            return tags
        SLEEP_LOG.append("release_memory_occupation" + tags_suffix(tags))
        if in_flight():
            # release_memory_occupation: `assert self._is_no_request(), "release_memory_occupation should be called
            # only when no ongoing request."` runs in the scheduler process: the server dies, no HTTP answer.
            scheduler_crash("AssertionError: release_memory_occupation should be called only when no ongoing "
                            "request.")
        for tag in tags or SglangState.ALL_TAGS:  # null or [] = GPU_MEMORY_ALL_TYPES
            sglang.released.add(tag)
        if (args.enable_memory_saver and "weights" in (tags or SglangState.ALL_TAGS)
                and not args.enable_weights_cpu_backup):
            # The weights' region has enable_cpu_backup=False: paused pages are dropped, the resumed ones hold
            # garbage. Without --enable-memory-saver the adapter is _TorchMemorySaverAdapterNoop
            # (python/sglang/srt/torch_memory_saver_adapter.py): nothing is freed and nothing is lost.
            sglang.weights_valid = False
        return web.json_response(None)  # the handler returns None: 200 with JSON null

    async def sglang_flush_cache(request: web.Request) -> web.Response:
        # http_server.py flush_cache: 200 when the scheduler's flush_cache ran (is_fully_idle), else 400 ("When there
        # are running or waiting requests, the operation will not be performed."); GET or POST.
        SLEEP_LOG.append("flush_cache")
        text = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
                "requests, the operation will not be performed.)\n")
        return web.Response(text=text, status=400 if in_flight() else 200)

    async def sglang_resume(request: web.Request) -> web.Response:
        tags = await sglang_tags(request)
        if isinstance(tags, web.Response):
            return tags
        SLEEP_LOG.append("resume_memory_occupation" + tags_suffix(tags))
        for tag in tags or SglangState.ALL_TAGS:  # null or [] = all three, released or not
            if tag not in sglang.released:
                # resume_memory_occupation: `self.offload_tags.remove(tag)` raises KeyError for a tag that was
                # not released (a resume of {} after releasing kv_cache and cuda_graph only, a second resume).
                scheduler_crash(f"KeyError: {tag!r}")
            sglang.released.discard(tag)
        return web.json_response(None)

    async def sglang_update_weights_from_disk(request: web.Request) -> web.Response:
        body = await sglang_body(request)
        if isinstance(body, web.Response):
            return body
        model_path = body.get("model_path")
        if not isinstance(model_path, str):
            return sglang_invalid("[{'type': 'missing', 'loc': ('body', 'model_path'), 'msg': 'Field required'}]")
        SLEEP_LOG.append(f"update_weights_from_disk model_path={model_path}")
        if args.enable_memory_saver and "weights" in sglang.released:
            # Unverified upstream: loading into released (unmapped) weight memory. The fake refuses it.
            return web.json_response({"success": False, "message": "fake: the weights' memory is released",
                                      "num_paused_requests": 0}, status=400)
        sglang.weights_valid = True
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0})

    async def embeddings(request: web.Request) -> web.Response:
        STATS["requests"] += 1
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return web.json_response({"object": "list", "data": data, "model": args.model,
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def openai_guard(request: web.Request) -> web.Response | None:
        """What a request to the other OpenAI-style endpoints meets first: what a completion meets."""
        STATS["requests"] += 1
        if flavor == "generic":
            if asleep() or SLEEP["level"] == 2:
                return web.json_response({"error": {"message": "engine is sleeping", "code": "sleeping"}}, status=503)
            return None
        return await admit(request)

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Fake-Ready-At"] = ready_at

    if flavor != "generic":
        EXTRA_STATS.update(garbage_answers=0, queued_while_asleep=0, aborted=0, rejected_draining=0,
                           health_generations=0)
    app = web.Application()
    app.on_response_prepare.append(stamp)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    if flavor == "generic" and args.enable_sleep_mode and dev_mode:
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_post("/collective_rpc", collective_rpc)
        app.router.add_get("/is_sleeping", is_sleeping)
    if flavor == "vllm" and args.enable_sleep_mode and dev_mode:
        # Upstream attaches the dev routes whenever VLLM_SERVER_DEV_MODE is set (register_vllm_dev_api_routers);
        # without --enable-sleep-mode a sleep cannot free anything. The gateway sets both, so the fake asks both.
        app.router.add_post("/sleep", vllm_sleep)
        app.router.add_post("/wake_up", vllm_wake_up)
        app.router.add_post("/collective_rpc", vllm_collective_rpc)
        app.router.add_get("/is_sleeping", vllm_is_sleeping)
        app.router.add_post("/reset_prefix_cache", vllm_reset_prefix_cache)
    if flavor == "sglang":
        # Registered whatever the flags: without --enable-memory-saver they answer 200 and free nothing.
        app.router.add_get("/health_generate", sglang_health)
        for method in ("GET", "POST"):
            app.router.add_route(method, "/release_memory_occupation", sglang_release)
            app.router.add_route(method, "/resume_memory_occupation", sglang_resume)
        app.router.add_post("/update_weights_from_disk", sglang_update_weights_from_disk)
        for method in ("GET", "POST"):
            app.router.add_route(method, "/flush_cache", sglang_flush_cache)
    app.router.add_get("/sleep_log", lambda request: web.json_response(SLEEP_LOG))
    add_openai_endpoints(app, args, openai_guard)
    add_engine_routes(app, args, lambda: None if flavor != "llamacpp" or ready() else llamacpp_loading())
    return app


# The engines' own routes beyond /v1 (the gateway forwards some: gateway/engine_routes.py), in their engines' shapes,
# and a few it must never reach. Every call is listed, in order, at GET /route_log ("METHOD /path?query").
ROUTE_LOG: list[str] = []


def fake_tokens(text: str) -> list[int]:
    return [sum(map(ord, word)) % 1000 for word in text.split()]


def add_engine_routes(app: web.Application, args: argparse.Namespace,
                      refusal: Callable[[], web.Response | None]) -> None:
    """`refusal`: the answer every route gets while the engine can't serve (llama.cpp while it loads), else None."""
    flavor = args.flavor

    def route(method: str, path: str, answer: Callable[[dict], object]) -> None:
        async def handler(request: web.Request) -> web.Response:
            ROUTE_LOG.append(f"{request.method} {request.path_qs}")
            if (refused := refusal()) is not None:
                return refused
            body = await request.json() if request.can_read_body else {}
            reply = answer(body)
            return reply if isinstance(reply, web.Response) else web.json_response(reply)
        app.router.add_route(method, path, handler)

    if flavor == "vllm":
        # vllm/entrypoints/serve/tokenize/api_router.py (tokenize, detokenize; the model, when named, must be one it
        # serves: OpenAIServing._check_model), vllm/entrypoints/openai/api_server.py (version, load).
        def vllm_tokenize(body: dict) -> object:
            if body.get("model") not in (None, args.model):
                return web.json_response({"error": {"message": f"The model `{body['model']}` does not exist.",
                                                    "type": "NotFoundError", "param": "model", "code": 404}},
                                         status=404)
            tokens = fake_tokens(body.get("prompt", ""))
            return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens, "token_strs": None}
        route("POST", "/tokenize", vllm_tokenize)
        route("POST", "/detokenize", lambda body: {"prompt": " ".join(f"t{t}" for t in body.get("tokens", []))})
        route("GET", "/version", lambda body: {"version": "0.0.0+fake"})
        route("GET", "/load", lambda body: {"server_load": len(in_flight())})
    if flavor == "llamacpp":
        # tools/server/server.cpp: GET and POST /props, GET /slots, POST /slots/:id_slot, tokenize, detokenize,
        # apply-template; shapes from tools/server/README.md.
        route("POST", "/tokenize", lambda body: {"tokens": fake_tokens(body.get("content", ""))})
        route("POST", "/detokenize", lambda body: {"content": " ".join(f"t{t}" for t in body.get("tokens", []))})
        route("POST", "/apply-template", lambda body: {"prompt": "".join(
            f"<|{m.get('role')}|>{m.get('content')}" for m in body.get("messages", []))})
        route("GET", "/props", lambda body: {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 1,
                                             "model_path": args.model, "chat_template": "{{ messages }}",
                                             "build_info": "fake"})
        route("POST", "/props", lambda body: {"success": True})
        route("GET", "/slots", lambda body: [{"id": 0, "n_ctx": 4096, "speculative": False,
                                              "is_processing": bool(in_flight())}])
        route("POST", "/slots/{id_slot}", lambda body: {"id_slot": 0, "n_erased": 0})
    if flavor == "sglang":
        # python/sglang/srt/entrypoints/http_server.py: get_model_info, get_server_info (server_args as a dict, the
        # api_key among them: env FAKE_SGLANG_API_KEY stands for --api-key), get_load, tokenize, detokenize.
        route("POST", "/tokenize", lambda body: {"tokens": fake_tokens(body.get("prompt", "")),
                                                 "count": len(fake_tokens(body.get("prompt", ""))),
                                                 "max_model_len": 4096})
        route("POST", "/detokenize", lambda body: {"text": " ".join(f"t{t}" for t in body.get("tokens", []))})
        route("GET", "/get_model_info", lambda body: {"model_path": args.model_path, "tokenizer_path": args.model_path,
                                                      "is_generation": True})
        route("GET", "/get_server_info", lambda body: {
            "model_path": args.model_path, "served_model_name": args.model, "api_key": os.environ.get(
                "FAKE_SGLANG_API_KEY"), "admin_api_key": None, "max_total_num_tokens": 4096,
            "internal_states": [{"last_gen_throughput": 0.0}], "version": "0.0.0+fake"})
        route("GET", "/get_load", lambda body: [{"dp_rank": 0, "num_reqs": len(in_flight()), "num_waiting_reqs": 0}])
    if flavor == "trtllm":
        # tensorrt_llm/serve/openai_server.py: version; /metrics and /perf_metrics drain what they return.
        route("GET", "/version", lambda body: {"version": "0.0.0+fake"})
        route("GET", "/metrics", lambda body: [])
        route("GET", "/perf_metrics", lambda body: [])
    app.router.add_get("/route_log", lambda request: web.json_response(ROUTE_LOG))


# The other OpenAI-style endpoints (issue 19), in the shapes of the servers that answer them:
#   /v1/audio/transcriptions, /v1/audio/translations (multipart forms): vLLM's
#       vllm/entrypoints/openai/speech_to_text/api_router.py and protocol.py (TranscriptionRequest read with
#       Form(): `stream` among the fields; TranscriptionResponse {"text", "usage": {"type": "duration", "seconds"}},
#       "transcription.chunk" / "translation.chunk" events when streamed);
#   /v1/audio/speech (JSON in, audio bytes out): OpenAI's createSpeech; vLLM-Omni's
#       vllm_omni/entrypoints/openai/protocol/audio.py (stream_format "audio": raw bytes, "sse" or stream=true:
#       speech.audio.delta events, `is_sse_stream`);
#   /v1/images/generations (JSON) and /v1/images/edits (a form): OpenAI's images API, {"created", "data":
#       [{"b64_json"}]}, as vLLM-Omni serves it;
#   /v1/rerank: vLLM's vllm/entrypoints/pooling/scoring/protocol.py (RerankResponse: id, model, usage, results of
#       {index, document: {text}, relevance_score}, best first, top_n 0 = all); llama.cpp's format_response_rerank
#       (tools/server/server-common.cpp: {model, object: "list", usage, results of {index, relevance_score}});
#   /v1/score: vLLM's ScoreResponse in the same file ({id, object: "list", created, model, data of {index, object:
#       "score", score}, usage}; text_1 against each of text_2, or pairwise);
#   /v1/messages (Anthropic's Messages API): vLLM's vllm/entrypoints/anthropic/serving.py (AnthropicMessagesResponse;
#       streamed as `event: NAME` + `data:` lines: message_start, content_block_start, content_block_delta...,
#       content_block_stop, message_delta, message_stop); llama.cpp serves /v1/messages too (server.cpp).
# Generic serves them all (one engine for the gateway's routing tests); the vllm flavour what vLLM itself serves
# (speech and images are vLLM-Omni's), llamacpp /v1/rerank and /v1/messages.
# Every file of a form is hashed as it is read and listed at GET /stats under "uploads" (the key appears once a
# form has come): {"path", "fields" (the text fields), "files": [{"name", "filename", "content_type", "size",
# "sha256"}]}.
UPLOADS: list[dict] = []
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}


def speech_audio(text: str, size: int = 64 * 1024) -> bytes:
    """The fake's audio for `text`: a function of the text (a tag, then its digest repeated), so that a test can
    check every byte relayed."""
    digest = hashlib.sha256(text.encode()).digest()
    return (b"ID3\x04\x00\x00" + digest * (size // len(digest) + 1))[:size]


def relevance(query: str, document: str) -> float:
    """A score in [0, 1]: the share of the query's words the document has."""
    words = set(query.lower().split())
    return round(len(words & set(document.lower().split())) / len(words), 4) if words else 0.0


async def read_form(request: web.Request) -> tuple[dict[str, str], list[dict]] | web.Response:
    """The text fields and the files of a multipart/form-data request, each file hashed chunk by chunk as it is
    read (aiohttp's multipart reader: nothing held whole)."""
    if not request.content_type.startswith("multipart/form-data"):
        return web.json_response({"error": {"message": f"expected a form, not {request.content_type}",
                                            "type": "BadRequestError", "code": 400}}, status=400)
    reader = await request.multipart()
    fields: dict[str, str] = {}
    files: list[dict] = []
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            return web.json_response({"error": {"message": "nested multipart", "code": 400}}, status=400)
        if part.filename is None:
            fields[part.name or ""] = await part.text()
            continue
        digest, size = hashlib.sha256(), 0
        while chunk := await part.read_chunk(64 * 1024):
            digest.update(chunk)
            size += len(chunk)
        files.append({"name": part.name, "filename": part.filename, "content_type": part.headers.get("Content-Type"),
                      "size": size, "sha256": digest.hexdigest()})
    return fields, files


def add_openai_endpoints(app: web.Application, args: argparse.Namespace,
                         guard: Callable[[web.Request], Awaitable[web.Response | None]]) -> None:
    """The endpoints above, for the flavours that serve them. `guard`: what a completion meets first (a sleeping
    engine, llama.cpp loading...): an answer refusing the request, or None."""
    flavor = args.flavor

    def not_served(model: object) -> web.Response:
        return web.json_response({"error": {"message": f"model {model!r} not served here", "code": "model_not_found"}},
                                 status=404)

    async def served_form(request: web.Request) -> tuple[dict[str, str], list[dict]] | web.Response:
        """A form request's fields and files, or the answer refusing it: the guard, not a form, another model."""
        refusal = await guard(request)
        if refusal is not None:
            return refusal
        form = await read_form(request)
        if isinstance(form, web.Response):
            return form
        if form[0].get("model") != args.model:
            return not_served(form[0].get("model"))
        return form

    async def json_body(request: web.Request) -> dict | web.Response:
        refusal = await guard(request)
        if refusal is not None:
            return refusal
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400)
        if not isinstance(body, dict) or body.get("model") != args.model:
            return not_served(body.get("model") if isinstance(body, dict) else None)
        return body

    async def sse_response(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        return resp

    async def transcription(request: web.Request) -> web.StreamResponse:
        form = await served_form(request)
        if isinstance(form, web.Response):
            return form
        fields, files = form
        audio = [f for f in files if f["name"] == "file"]
        if len(audio) != 1:
            return web.json_response({"error": {"message": "file: Field required", "type": "BadRequestError",
                                                "code": 400}}, status=400)
        UPLOADS.append({"path": request.path, "fields": fields, "files": files})
        kind = "translation" if request.path.endswith("translations") else "transcription"
        text = f"{kind} of {audio[0]['size']} bytes sha256 {audio[0]['sha256'][:16]}"
        if fields.get("stream", "false").lower() == "true":
            STATS["streams_started"] += 1
            resp = await sse_response(request)
            words = text.split(" ")
            for i, word in enumerate(words):
                last = i == len(words) - 1
                await resp.write(sse({"id": "trsc-fake-1", "object": f"{kind}.chunk", "created": created(),
                                      "model": args.model, "choices": [{"delta": {"content": (" " if i else "") + word},
                                                                        "finish_reason": "stop" if last else None,
                                                                        "stop_reason": None}]}))
                await asyncio.sleep(args.token_delay)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            STATS["streams_completed"] += 1
            return resp
        response_format = fields.get("response_format", "json")
        if response_format == "text":
            return web.Response(text=text)
        if response_format in ("srt", "vtt"):
            cue = "00:00:00,000 --> 00:00:01,000" if response_format == "srt" else "00:00:00.000 --> 00:00:01.000"
            head = "1\n" if response_format == "srt" else "WEBVTT\n\n"
            return web.Response(text=f"{head}{cue}\n{text}\n")
        if response_format == "verbose_json":
            return web.json_response({"duration": "1.0", "language": fields.get("language", "en"), "text": text,
                                      "segments": [], "words": None})
        return web.json_response({"text": text, "usage": {"type": "duration", "seconds": 1}})

    async def speech(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        audio = speech_audio(str(body.get("input", "")))
        pieces = [audio[i:i + 16 * 1024] for i in range(0, len(audio), 16 * 1024)]
        stream_format = body.get("stream_format")
        if (body.get("stream") is True or stream_format == "sse") and stream_format != "audio":
            STATS["streams_started"] += 1
            resp = await sse_response(request)
            for piece in pieces:
                await resp.write(sse({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}))
                await asyncio.sleep(args.token_delay)
            await resp.write(sse({"type": "speech.audio.done",
                                  "usage": {"input_tokens": 4, "output_tokens": len(pieces), "total_tokens": 4}}))
            await resp.write_eof()
            STATS["streams_completed"] += 1
            return resp
        fmt = body.get("response_format") or "mp3"
        resp = web.StreamResponse(headers={"Content-Type": AUDIO_TYPES.get(fmt, "application/octet-stream")})
        await resp.prepare(request)
        for piece in pieces:  # the audio as it is made: chunked, no Content-Length
            await resp.write(piece)
            await asyncio.sleep(args.token_delay)
        await resp.write_eof()
        return resp

    def images(prompt: str, n: int) -> dict:
        data = [{"b64_json": base64.b64encode(b"\x89PNG\r\n\x1a\n" + hashlib.sha256(f"{prompt}/{i}".encode())
                                              .digest()).decode(), "revised_prompt": None} for i in range(n)]
        return {"created": created(), "data": data}

    async def image_generation(request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response(images(str(body.get("prompt", "")), int(body.get("n") or 1)))

    async def image_edit(request: web.Request) -> web.Response:
        form = await served_form(request)
        if isinstance(form, web.Response):
            return form
        fields, files = form
        UPLOADS.append({"path": request.path, "fields": fields, "files": files})
        return web.json_response(images(fields.get("prompt", ""), int(fields.get("n") or 1)))

    async def rerank(request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        query, documents = str(body.get("query", "")), [str(d) for d in body.get("documents") or []]
        ranked = sorted(range(len(documents)), key=lambda i: -relevance(query, documents[i]))
        top_n = int(body.get("top_n") or 0)
        if top_n > 0:
            ranked = ranked[:top_n]
        tokens = len(query.split()) * len(documents) + sum(len(d.split()) for d in documents)
        if flavor == "llamacpp":
            return web.json_response({"model": args.model, "object": "list",
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                      "results": [{"index": i, "relevance_score": relevance(query, documents[i])}
                                                  for i in ranked]})
        return web.json_response({"id": "rerank-fake-1", "model": args.model,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                  "results": [{"index": i, "document": {"text": documents[i]},
                                               "relevance_score": relevance(query, documents[i])} for i in ranked]})

    async def score(request: web.Request) -> web.Response:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        first, second = body.get("text_1", body.get("queries")), body.get("text_2", body.get("documents"))
        first = first if isinstance(first, list) else [first]
        second = second if isinstance(second, list) else [second]
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            return web.json_response({"error": {"message": "text_1 and text_2 must have the same length",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        data = [{"index": i, "object": "score", "score": relevance(str(a), str(b))}
                for i, (a, b) in enumerate(zip(first, second, strict=True))]
        return web.json_response({"id": "score-fake-1", "object": "list", "created": created(), "model": args.model,
                                  "data": data, "usage": {"prompt_tokens": len(data), "total_tokens": len(data),
                                                          "completion_tokens": 0}})

    def event(name: str, data: dict) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        tokens = int(body.get("max_tokens") or 8)
        texts = [f" t{i}" for i in range(tokens)]
        message = {"id": "msg_fake_1", "type": "message", "role": "assistant", "model": args.model}
        if not body.get("stream"):
            return web.json_response({**message, "content": [{"type": "text", "text": "".join(texts)}],
                                      "stop_reason": "max_tokens", "stop_sequence": None,
                                      "usage": {"input_tokens": 4, "output_tokens": tokens}})
        STATS["streams_started"] += 1
        resp = await sse_response(request)
        try:
            await resp.write(event("message_start", {"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 4, "output_tokens": 0}}}))
            await resp.write(event("content_block_start", {"type": "content_block_start", "index": 0,
                                                           "content_block": {"type": "text", "text": ""}}))
            for text in texts:
                await resp.write(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                               "delta": {"type": "text_delta", "text": text}}))
                await asyncio.sleep(args.token_delay)
            await resp.write(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
            await resp.write(event("message_delta", {"type": "message_delta",
                                                     "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                                     "usage": {"output_tokens": tokens}}))
            await resp.write(event("message_stop", {"type": "message_stop"}))
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            STATS["streams_cancelled"] += 1
            raise
        STATS["streams_completed"] += 1
        return resp

    served = {
        "generic": ("transcriptions", "translations", "speech", "images", "rerank", "score", "messages"),
        "vllm": ("transcriptions", "translations", "rerank", "score", "messages"),
        "llamacpp": ("rerank", "messages"),
    }.get(flavor, ())
    routes = {"transcriptions": [("/v1/audio/transcriptions", transcription)],
              "translations": [("/v1/audio/translations", transcription)],
              "speech": [("/v1/audio/speech", speech)],
              "images": [("/v1/images/generations", image_generation), ("/v1/images/edits", image_edit)],
              "rerank": [("/v1/rerank", rerank)],
              "score": [("/v1/score", score)],
              "messages": [("/v1/messages", messages)]}
    for name in served:
        for path, handler in routes[name]:
            app.router.add_post(path, handler)


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to the port but not listening: connections to it are refused.

    What vLLM (vllm/entrypoints/openai/api_server.py create_server_socket, before the engine is built) and
    trtllm-serve (tensorrt_llm/commands/serve.py launch_server: s.bind() before the LLM is built) hold while
    they load; SGLang listens only once its scheduler is up (http_server.py launch_server).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def serve_vllm(app: web.Application, vllm: VllmState, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serve until SIGTERM, then stop as vLLM does with --shutdown-timeout N (PR #36666, vLLM 0.18).

    New requests are refused at once; in-flight ones get up to N seconds to finish (N = 0, the default: none),
    then the rest are aborted and the process exits.
    """
    # No shutdown_timeout here: aiohttp 3.8 (the Docker test image's, Debian bookworm) hands AppRunner's keyword
    # arguments to every connection's handler, which then fails and resets each connection.
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    vllm.draining = True
    deadline = loop.time() + shutdown_timeout
    print(f"shutting down: {len(in_flight())} requests in flight, waiting up to {shutdown_timeout:g} s", flush=True)
    while in_flight() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    aborted = list(RUNNING)
    for task in aborted:
        task.cancel()
    if aborted:
        print(f"aborted {len(aborted)} requests", flush=True)
        await asyncio.gather(*aborted, return_exceptions=True)
    await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flavor", choices=FLAVORS, default="generic", help="behave like this engine")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("weights", nargs="?", default=None, help="positional model, as `vllm serve MODEL`")
    ap.add_argument("--model", "--served-model-name", "--served_model_name", dest="model", default=None)
    ap.add_argument("--enable-sleep-mode", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
    ap.add_argument("--shutdown-timeout", type=float, default=0.0, help="vllm: drain on SIGTERM for up to S")
    ap.add_argument("--model-path", default=None, help="sglang: the weights (also the served name by default)")
    ap.add_argument("--mem-fraction-static", type=float, default=None)
    ap.add_argument("--enable-memory-saver", action="store_true")
    ap.add_argument("--enable-weights-cpu-backup", action="store_true")
    ap.add_argument("--listen-after", type=float, default=0.0, help="sglang: refuse connections for S (loading)")
    ap.add_argument("--alias", "-a", default=None, help="llamacpp: the served name")
    ap.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--ready-after", type=float, default=0.0)
    ap.add_argument("--never-ready", action="store_true")
    ap.add_argument("--exit-at-start", type=int, default=None, metavar="CODE")
    ap.add_argument("--token-delay", type=float, default=0.0)
    ap.add_argument("--no-done", action="store_true", help="end streams without data: [DONE]")
    ap.add_argument("--crash-after-tokens", type=int, default=None)
    ap.add_argument("--alloc-mb", type=int, default=0, help="touch this much memory at start (OOM tests)")
    ap.add_argument("--hang-requests", action="store_true", help="read completion requests, never answer them")
    ap.add_argument("--hang-health", action="store_true", help="readiness routes never answer")
    ap.add_argument("--created", type=int, default=None, help="fixed `created` timestamp (byte-identical answers)")
    args = ap.parse_args()
    if args.flavor == "llamacpp" and args.alias is not None:
        args.model = args.alias
    elif args.model is None:
        # SGLang serves --model-path under its own name unless --served-model-name says otherwise.
        args.model = args.model_path if args.flavor == "sglang" and args.model_path else "fake"
    global CREATED
    CREATED = args.created
    boot = (time.monotonic(), time.time())
    print(f"fake engine {args.model} starting on {args.host}:{args.port}", flush=True)
    if args.alloc_mb:
        print(f"allocating {args.alloc_mb} MB", flush=True)
        hog = bytearray(args.alloc_mb * 1024 * 1024)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
    if args.exit_at_start is not None:
        print("loading weights...", flush=True)
        print("error: out of memory while loading weights", file=sys.stderr, flush=True)
        sys.exit(args.exit_at_start)
    loads_before_listening = args.flavor in ("vllm", "trtllm") or (args.flavor == "sglang" and args.listen_after)
    if not loads_before_listening:
        web.run_app(make_app(args), host=args.host, port=args.port, print=None, access_log=None)
        return
    sock = bound_socket(args.host, args.port)
    print(f"loading weights ({args.flavor})...", flush=True)
    if args.never_ready and args.flavor != "sglang":
        while True:  # a load that never ends; SIGTERM ends the process as it would end the engine's
            time.sleep(3600)
    time.sleep(args.listen_after if args.flavor == "sglang" else args.ready_after)
    vllm = VllmState()
    app = make_app(args, boot, vllm)
    if args.flavor == "vllm":
        asyncio.run(serve_vllm(app, vllm, sock, args.shutdown_timeout))
    else:
        web.run_app(app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
