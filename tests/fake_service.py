"""A small stand-in for ComfyUI, for tests of services behind the gateway (gateway/services.py).

It answers the routes of ComfyUI's server.py that a client of its API uses, in their shapes:

    GET  /                 an HTML page (ComfyUI serves its web UI here)
    GET  /system_stats     JSON about the system (the readiness route the tests use; 503 until --ready-after)
    POST /prompt           {"prompt": {...}, "client_id": "..."} -> {"prompt_id", "number", "node_errors"}; queues a job
    GET  /history/{id}     {} until the job is done, then {id: {"outputs": ..., "status": {"completed": true}}}
    GET  /view?size=N      N bytes of image data, sent in 64 KiB chunks (a large download)
    POST /upload/image     a multipart form with `image`: {"name", "subfolder", "type", "size"}
    GET  /ws?clientId=ID   the WebSocket: {"type": "status", ...} first; for each job queued with this client_id,
                           "execution_start", then "progress" {"value": n, "max": m} for n = 1..m, then "executed"
                           and "executing" {"node": null} (how ComfyUI says a prompt is done). A text message
                           {"type": "echo", "data": X} is answered {"type": "echo", "data": X}; a binary message
                           is answered with the same bytes behind ComfyUI's 4-byte event type 1 (a preview image).
    GET  /stats            what happened: requests by path, sockets open and opened, headers seen by /prompt
    GET  /hang             never answers (a service stuck before its answer, or its WebSocket handshake)
    POST /crash            the process ends at once, mid-request (a service that crashes)

    python tests/fake_service.py --port P [--steps M] [--step-delay S] [--ready-after S]
"""

import argparse
import asyncio
import itertools
import json
import os
import struct
import time
import uuid

from aiohttp import WSMsgType, web

REQUESTS: dict[str, int] = {}  # by path
SOCKETS_COUNT = {"sockets_open": 0, "sockets_opened": 0}
LAST_PROMPT_HEADERS: dict[str, str] = {}
SOCKETS: dict[str, web.WebSocketResponse] = {}
HISTORY: dict[str, dict[str, object]] = {}
JOBS: set[asyncio.Task[None]] = set()
NUMBER = itertools.count()
PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE


def count(request: web.Request) -> None:
    REQUESTS[request.path] = REQUESTS.get(request.path, 0) + 1


async def index(request: web.Request) -> web.Response:
    count(request)
    return web.Response(text="<!doctype html><title>fake ComfyUI</title><script src='main.js'></script>",
                        content_type="text/html")


async def system_stats(request: web.Request) -> web.Response:
    count(request)
    if time.monotonic() < request.app["ready_at"]:
        return web.Response(status=503, text="starting")
    return web.json_response({"system": {"os": "posix", "comfyui_version": "fake"}, "devices": []})


async def post_prompt(request: web.Request) -> web.Response:
    count(request)
    LAST_PROMPT_HEADERS.clear()
    LAST_PROMPT_HEADERS.update(request.headers)
    body = await request.json()
    if "prompt" not in body:
        return web.json_response({"error": "no prompt", "node_errors": []}, status=400)
    prompt_id = str(uuid.uuid4())
    number = next(NUMBER)
    HISTORY[prompt_id] = {}
    job = asyncio.create_task(run_job(request.app, prompt_id, body.get("client_id")))
    JOBS.add(job)
    job.add_done_callback(JOBS.discard)
    return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": {}})


async def run_job(app: web.Application, prompt_id: str, client_id: str | None) -> None:
    steps, delay = app["steps"], app["step_delay"]
    await send(client_id, "execution_start", {"prompt_id": prompt_id})
    for value in range(1, steps + 1):
        await asyncio.sleep(delay)
        await send(client_id, "progress", {"value": value, "max": steps, "prompt_id": prompt_id, "node": "3"})
    output = {"images": [{"filename": f"{prompt_id}.png", "subfolder": "", "type": "output"}]}
    HISTORY[prompt_id] = {prompt_id: {"outputs": {"9": output}, "status": {"completed": True}}}
    await send(client_id, "executed", {"node": "9", "output": output, "prompt_id": prompt_id})
    await send(client_id, "executing", {"node": None, "prompt_id": prompt_id})


async def send(client_id: str | None, kind: str, data: dict[str, object]) -> None:
    """To the job's client, as ComfyUI does (`send_json(event, data, sid)`); to everyone without one."""
    targets = list(SOCKETS.values()) if client_id is None else [s for k, s in SOCKETS.items() if k == client_id]
    for ws in targets:
        if not ws.closed:
            await ws.send_json({"type": kind, "data": data})


async def history(request: web.Request) -> web.Response:
    count(request)
    return web.json_response(HISTORY.get(request.match_info["prompt_id"], {}))


async def view(request: web.Request) -> web.StreamResponse:
    count(request)
    size = int(request.query.get("size", "0"))
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    await response.prepare(request)
    chunk = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < size:
        part = chunk[: min(len(chunk), size - sent)]
        await response.write(part)
        sent += len(part)
    await response.write_eof()
    return response


async def upload_image(request: web.Request) -> web.Response:
    count(request)
    form = await request.post()
    image = form.get("image")
    if not isinstance(image, web.FileField):
        return web.Response(status=400)
    data = image.file.read()
    return web.json_response({"name": image.filename, "subfolder": "", "type": "input", "size": len(data)})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    count(request)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sid = request.query.get("clientId") or uuid.uuid4().hex
    SOCKETS[sid] = ws
    SOCKETS_COUNT["sockets_open"] += 1
    SOCKETS_COUNT["sockets_opened"] += 1
    try:
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}})
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                message = json.loads(msg.data)
                if message.get("type") == "echo":
                    await ws.send_json({"type": "echo", "data": message.get("data")})
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(struct.pack(">I", PREVIEW_IMAGE) + msg.data)
    finally:
        if SOCKETS.get(sid) is ws:
            del SOCKETS[sid]
        SOCKETS_COUNT["sockets_open"] -= 1
    return ws


async def hang(request: web.Request) -> web.Response:
    count(request)
    await asyncio.Event().wait()
    raise AssertionError("never reached")


async def crash(request: web.Request) -> web.Response:
    os._exit(1)


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"requests": REQUESTS, **SOCKETS_COUNT, "last_prompt_headers": LAST_PROMPT_HEADERS})


def build(steps: int, step_delay: float, ready_after: float) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app["steps"], app["step_delay"] = steps, step_delay
    app["ready_at"] = time.monotonic() + ready_after
    app.router.add_get("/", index)
    app.router.add_get("/system_stats", system_stats)
    app.router.add_post("/prompt", post_prompt)
    app.router.add_get("/history/{prompt_id}", history)
    app.router.add_get("/view", view)
    app.router.add_post("/upload/image", upload_image)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/stats", stats)
    app.router.add_get("/hang", hang)
    app.router.add_post("/crash", crash)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--steps", type=int, default=5, help="progress messages per job")
    parser.add_argument("--step-delay", type=float, default=0.01, help="seconds between progress messages")
    parser.add_argument("--ready-after", type=float, default=0.0, help="/system_stats answers 503 until then")
    args = parser.parse_args()
    web.run_app(build(args.steps, args.step_delay, args.ready_after), host=args.host, port=args.port,
                print=None, handle_signals=True)


if __name__ == "__main__":
    main()
