"""Service adapter: a program that is not an OpenAI server (ComfyUI, a TTS or OCR server...), reached by its own
HTTP and WebSocket API under /services/<name>/ (gateway/services.py), and woken, budgeted and evicted like a model.

It is launched as `engine: generic` is: `command + args` as written, with the placeholders `{host}`, `{port}`,
`{model}`, `{name}` filled in (GenericEngine). What differs is what the waker may assume of it: nothing OpenAI-shaped.
Readiness is `GET health_path` answering 200, by default `/` (any web server answers its root; ComfyUI serves its UI
there once its API is up). No metrics route is assumed (an unknown server's `/metrics` is not ours to poll), and no
sleep mode.
"""

from waker.config.spec import EngineKind, ModelSpec
from waker.engines.base import Readiness
from waker.engines.generic import GenericEngine


class ServiceEngine(GenericEngine):
    """Launches `command + args` like the generic adapter; ready when `health_path` (default `/`) answers 200."""

    kind: str = EngineKind.SERVICE.value
    metrics_path: str | None = None

    def readiness(self, spec: ModelSpec) -> Readiness:
        return Readiness(path=spec.health_path or "/", expect_model=False)
