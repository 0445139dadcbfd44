"""A small OpenAI-compatible engine for tests that must force timing and failures.

Behaves like the real servers where it matters: `/health` (503 until ready), `/v1/models`,
chat and text completions with SSE framing (`data: {...}\\n\\n`, then `data: [DONE]`), embeddings.
Counts what happened at `GET /stats`, including streams the client abandoned.

    python tests/fake_engine.py --port P --model NAME [--ready-after S] [--never-ready]
        [--exit-at-start CODE] [--token-delay S] [--no-done] [--crash-after-tokens N] [--alloc-mb N]
        [--hang-requests] [--hang-health]

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
"""

import argparse
import asyncio
import json
import os
import sys
import time

from aiohttp import web

STATS = {"requests": 0, "streams_started": 0, "streams_completed": 0, "streams_cancelled": 0, "hung": 0,
         "fim_requests": 0, "tool_calls": 0}
# vLLM sleep mode, as documented (https://docs.vllm.ai/en/latest/features/sleep_mode/): routes exist
# only with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1; POST /sleep?level=1|2, POST /wake_up
# (optionally ?tags=weights / ?tags=kv_cache), POST /collective_rpc {"method": "reload_weights"},
# GET /is_sleeping. Every call is recorded in SLEEP_LOG for tests to check the sequence.
SLEEP = {"level": 0, "weights": True, "kv_cache": True}
SLEEP_LOG: list[str] = []


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


def make_app(args: argparse.Namespace) -> web.Application:
    started = time.monotonic()
    # When /health turns 200, on the wall clock: every answer says it (bench/wake.py measures what a cold
    # request waits beyond this moment).
    ready_at = f"{time.time() + args.ready_after:.6f}"

    def ready() -> bool:
        return not args.never_ready and time.monotonic() - started >= args.ready_after

    async def hang(request: web.Request) -> web.Response:
        await request.read()  # the request is read in full: only the answer never comes
        STATS["hung"] += 1
        print(f"hanging {request.method} {request.path}", flush=True)
        await asyncio.Event().wait()  # until the client gives up (or the process ends)
        raise AssertionError("unreachable")

    async def health(request: web.Request) -> web.Response:
        if args.hang_health:
            return await hang(request)
        return web.json_response({"status": "ok"} if ready() else {"status": "loading"}, status=200 if ready() else 503)

    async def models(request: web.Request) -> web.Response:
        if args.hang_health:
            return await hang(request)
        if not ready():
            return web.json_response({"error": {"message": "loading"}}, status=503)
        return web.json_response({"object": "list", "data": [{"id": args.model, "object": "model"}]})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**STATS, "pid": os.getpid()})

    async def completions(request: web.Request) -> web.StreamResponse:
        STATS["requests"] += 1
        if asleep() or SLEEP["level"] == 2:  # level 2 without reload_weights: weights are garbage
            return web.json_response({"error": {"message": "engine is sleeping", "code": "sleeping"}}, status=503)
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
            text = "".join(f" t{i}" for i in range(tokens))
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
                    finish = "length" if i == tokens - 1 else None
                    await resp.write(chunk(args.model, f" t{i}", finish, kind, include_usage))
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

    async def embeddings(request: web.Request) -> web.Response:
        STATS["requests"] += 1
        body = await request.json()
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))]
        return web.json_response({"object": "list", "data": data, "model": args.model,
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Fake-Ready-At"] = ready_at

    app = web.Application()
    app.on_response_prepare.append(stamp)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    if args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
        app.router.add_post("/sleep", sleep)
        app.router.add_post("/wake_up", wake_up)
        app.router.add_post("/collective_rpc", collective_rpc)
        app.router.add_get("/is_sleeping", is_sleeping)
    app.router.add_get("/sleep_log", lambda request: web.json_response(SLEEP_LOG))
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("weights", nargs="?", default=None, help="positional model, as `vllm serve MODEL`")
    ap.add_argument("--model", "--served-model-name", dest="model", default="fake")
    ap.add_argument("--enable-sleep-mode", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=None)
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
    global CREATED
    CREATED = args.created
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
    web.run_app(make_app(args), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
