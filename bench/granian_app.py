"""sparkgate's app for granian (https://github.com/emmett-framework/granian), to measure another server beside uvicorn
(issue 20): `bench/granian_app.py:app` is a factory that builds the gateway from SPARKGATE_* settings, as `sparkgate
serve` does (the config dir's models, the API keys, the stats setting), without uvicorn.

    SPARKGATE_CONFIG_DIR=bench/models.d .venv/bin/granian --interface asgi --factory --loop uvloop --http 1 \\
        --workers 1 --port 18313 --no-ws bench.granian_app:app

Needs `pip install granian` (not a dependency of the gateway: the bench's experiment only).
"""
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import GatewaySettings


def app() -> FastAPI:
    return create_app(GatewaySettings())
