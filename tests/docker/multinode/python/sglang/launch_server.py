"""Fake `python3 -m sglang.launch_server` for tests, with SGLang's multi-node flags.

--nnodes N --node-rank R --dist-init-addr HOST:PORT: rank 0 listens on PORT, waits for the other N-1 ranks,
then serves the OpenAI API (tests/fake_engine.py) on --host/--port; ranks >= 1 connect to HOST:PORT and
answer a dummy /health on their --host/--port, as SGLang does. A lost peer ends every rank with code 1
(NCCL's collectives fail in the real one).
"""

import argparse
import asyncio
import json

from aiohttp import web
from fakecluster import connect, connect_timeout, fail, on_sigterm, say, serve_fake_engine  # the image's PYTHONPATH


async def rank0(args: argparse.Namespace, port: int, model: str) -> None:
    joined: dict[int, asyncio.StreamReader] = {}
    everyone = asyncio.Event()
    watch: asyncio.Future = asyncio.get_running_loop().create_future()

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await reader.readline()
        if not hello:  # a port probe (the runtime checking that we are up), not a rank
            return
        rank = json.loads(hello).get("rank", -1)
        joined[rank] = reader
        say(f"rank {rank} joined ({len(joined) + 1} of {args.nnodes})")
        if len(joined) == args.nnodes - 1:
            everyone.set()
        await reader.read()
        if not watch.done():
            watch.set_result(f"RuntimeError: NCCL error: rank {rank} is gone")

    server = await asyncio.start_server(peer, "0.0.0.0", port)
    say(f"Init torch distributed begin: waiting for {args.nnodes - 1} ranks on port {port}")
    await everyone.wait()
    say("All ranks joined; loading weights")
    async with server:
        await serve_fake_engine(args.host, args.port, model, watch)


async def rank_n(args: argparse.Namespace, host: str, port: int) -> None:
    reader, _ = await connect(host, port, {"rank": args.node_rank}, connect_timeout())
    say(f"rank {args.node_rank} joined {host}:{port}")
    app = web.Application()
    app.router.add_get("/health", lambda request: web.Response())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    await reader.read()
    fail("RuntimeError: NCCL error: rank 0 is gone")


def main() -> None:
    ap = argparse.ArgumentParser(prog="sglang.launch_server")
    ap.add_argument("--model-path", "--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--served-model-name")
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--dist-init-addr")
    ap.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--pp-size", "--pipeline-parallel-size", type=int, default=1)
    args, _ = ap.parse_known_args()
    model = args.served_model_name or args.model_path
    if args.nnodes > 1 and args.tp_size * args.pp_size % args.nnodes:
        fail(f"tp_size x pp_size must be a multiple of nnodes ({args.nnodes})")
    loop = asyncio.new_event_loop()
    on_sigterm(loop)
    if args.nnodes == 1:
        never: asyncio.Future = loop.create_future()
        loop.run_until_complete(serve_fake_engine(args.host, args.port, model, never))
        return
    host, _, port = args.dist_init_addr.rpartition(":")
    if args.node_rank == 0:
        loop.run_until_complete(rank0(args, int(port), model))
    else:
        loop.run_until_complete(rank_n(args, host, int(port)))


if __name__ == "__main__":
    main()
