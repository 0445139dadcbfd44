"""In-memory runtime and engine API: engines whose readiness, sleep and exit the test controls."""

import asyncio
from collections.abc import Sequence

from waker.config.spec import ModelSpec
from waker.engines.base import Call, Engine, Readiness
from waker.lifecycle.engine_api import EngineCallError
from waker.runtime.base import Exit, RuntimeUnavailable


class FakeHandle:
    def __init__(self, number: int) -> None:
        self.number = number
        self.ready = asyncio.Event()
        self._exited: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self.lines: list[str] = [f"engine {number} booting"]
        self.stops = 0
        self.asleep = False
        self.calls: list[str] = []  # sleep and wake calls it received, "METHOD path"
        self.fail_calls = False  # answer every sleep or wake call with an error

    @property
    def ident(self) -> str:
        return f"fake {self.number}"

    @property
    def root_url(self) -> str:
        return f"http://fake-{self.number}"

    @property
    def api_base(self) -> str:
        return self.root_url + "/v1"

    @property
    def exit_code(self) -> int | None:
        return self._exited.result().code if self._exited.done() else None

    def exit(self, code: int, line: str = "", oom: bool = False) -> None:
        if line:
            self.lines.append(line)
        if not self._exited.done():
            self._exited.set_result(Exit(code, oom))

    def lose_track(self, why: str) -> None:
        if not self._exited.done():
            self._exited.set_exception(RuntimeUnavailable(why))

    async def wait_exit(self) -> Exit:
        return await asyncio.shield(self._exited)

    async def stop(self, grace: float) -> int | None:
        self.stops += 1
        self.exit(0)
        return 0

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        return tuple(self.lines[-lines:])


class FakeRuntime:
    """Each start makes a FakeHandle; `auto_ready` makes it ready at once."""

    detached = False

    def __init__(self, auto_ready: bool = True) -> None:
        self.auto_ready = auto_ready
        self.handles: list[FakeHandle] = []
        self.specs: list[ModelSpec] = []  # as launched (with placed_on)
        self.started = asyncio.Event()
        self.fail_launch: Exception | None = None

    async def start(self, spec: ModelSpec, engine: Engine) -> FakeHandle:
        if self.fail_launch is not None:
            raise self.fail_launch
        handle = FakeHandle(len(self.handles) + 1)
        self.handles.append(handle)
        self.specs.append(spec)
        if self.auto_ready:
            handle.ready.set()
        self.started.set()
        return handle


class FakeEngineApi:
    """The engines' own API: ready when the fake handle says so; sleep and wake calls flip its `asleep`."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime

    def _handle(self, root_url: str) -> FakeHandle:
        return next(h for h in self._runtime.handles if h.root_url == root_url)

    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        await self._handle(root_url).ready.wait()

    async def call(self, root_url: str, calls: Sequence[Call], timeout: float) -> None:
        handle = self._handle(root_url)
        for call in calls:
            handle.calls.append(f"{call.method} {call.path}")
            if handle.fail_calls:
                raise EngineCallError(f"{call.method} {call.path} answered 500: no")
            if "sleep" in call.path or "release" in call.path:
                handle.asleep = True
            elif "wake" in call.path or "resume" in call.path:
                handle.asleep = False

    async def is_sleeping(self, root_url: str, call: Call) -> bool | None:
        return self._handle(root_url).asleep
