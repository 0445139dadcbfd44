"""In-memory runtime and engine API: engines whose readiness, sleep and exit the test controls."""

import asyncio
from collections.abc import Sequence

from waker.config.spec import ModelSpec
from waker.engines.base import Call, Engine, Readiness
from waker.lifecycle.engine_api import EngineCallError
from waker.runtime.base import Exit, Found, RuntimeUnavailable


class FakeHandle:
    def __init__(self, number: int, runtime: "FakeRuntime | None" = None) -> None:
        self.number = number
        self._runtime = runtime
        self.ready = asyncio.Event()
        self._exited: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self.lines: list[str] = [f"engine {number} booting"]
        self.stops = 0
        self.asleep = False
        self.calls: list[str] = []  # sleep and wake calls it received, "METHOD path"
        self.fail_calls = False  # answer every sleep or wake call with an error
        self.exit_after_wake = False  # exit just after answering its wake calls
        self.stays_asleep = False  # answers its wake calls, then still says it sleeps (a wake that did nothing)
        self.garbled = False  # answers its wake calls, then can't generate (a wake that broke it)
        self.notes: list[bool] = []  # SleepNotes: what the waker noted on it, in order
        self.fail_notes = False  # noting fails (a container whose file system can't be written)
        # Set: stop() waits for it (an engine that ignores SIGTERM for its grace); a cancelled stop kills it.
        self.stop_gate: asyncio.Event | None = None

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
        if not self._exited.done() or self._exited.exception() is not None:
            return None
        return self._exited.result().code

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

    def _reachable(self) -> None:
        if self._runtime is not None and self._runtime.down:
            raise RuntimeUnavailable("Docker on node 'local' is unreachable: Connection refused")

    async def stop(self, grace: float) -> int | None:
        self._reachable()
        self.stops += 1
        if self.stop_gate is not None and not self._exited.done():
            try:
                await self.stop_gate.wait()
            except asyncio.CancelledError:
                self.exit(137)  # cancel-safe, like the real handles: a cancelled stop still ends the engine
                raise
            self.exit(137)
        self.exit(0)
        return self.exit_code

    async def log_tail(self, lines: int) -> tuple[str, ...]:
        self._reachable()
        return tuple(self.lines[-lines:]) if lines > 0 else ()

    async def note_asleep(self, asleep: bool) -> None:
        self._reachable()
        if self.fail_notes:
            raise RuntimeError("read-only file system")
        self.notes.append(asleep)


class FakeRuntime:
    """Each start makes a FakeHandle; `auto_ready` makes it ready at once."""

    detached = False

    def __init__(self, auto_ready: bool = True) -> None:
        self.auto_ready = auto_ready
        self.handles: list[FakeHandle] = []
        self.specs: list[ModelSpec] = []  # as launched (with placed_on)
        self.started = asyncio.Event()
        self.fail_launch: Exception | None = None
        self.down = False  # the runtime is unreachable: start, stop and logs raise RuntimeUnavailable
        self.found: list[Found] = []  # what discover() reports (engines left by an earlier gateway)
        self.discarded: list[tuple[str, str]] = []  # (model, reason)

    async def start(self, spec: ModelSpec, engine: Engine) -> FakeHandle:
        if self.down:
            raise RuntimeUnavailable("Docker on node 'local' is unreachable: Connection refused")
        if self.fail_launch is not None:
            raise self.fail_launch
        handle = FakeHandle(len(self.handles) + 1, self)
        self.handles.append(handle)
        self.specs.append(spec)
        if self.auto_ready:
            handle.ready.set()
        self.started.set()
        return handle

    def leave_running(self, model: str, spec_hash: str, asleep: bool = False, note: bool | None = None) -> FakeHandle:
        """An engine an earlier gateway left running: found by discover(), with `note` as its sleep note."""
        handle = FakeHandle(len(self.handles) + 1, self)
        handle.ready.set()
        handle.asleep = asleep
        self.handles.append(handle)
        self.found.append(Found(model, spec_hash, True, handle, ("local",), note))
        return handle

    async def discover(self) -> list[Found]:
        return [f for f in self.found if f.handle.exit_code is None]

    async def discard(self, found: Found, reason: str) -> None:
        self.discarded.append((found.model, reason))
        await found.handle.stop(0)

    def claim(self, found: Found, spec: ModelSpec) -> FakeHandle:
        assert isinstance(found.handle, FakeHandle)
        return found.handle


class FakeEngineApi:
    """The engines' own API: ready when the fake handle says so; sleep and wake calls flip its `asleep`."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self._runtime = runtime
        self.block: asyncio.Event | None = None  # set: sleep and wake calls wait for it (an engine slow to answer)

    def _handle(self, root_url: str) -> FakeHandle:
        return next(h for h in self._runtime.handles if h.root_url == root_url)

    async def until_ready(self, root_url: str, check: Readiness, served_name: str) -> None:
        await self._handle(root_url).ready.wait()

    async def call(self, root_url: str, calls: Sequence[Call], timeout: float) -> None:
        handle = self._handle(root_url)
        if self.block is not None:
            await self.block.wait()
        for call in calls:
            handle.calls.append(f"{call.method} {call.path}")
            if handle.fail_calls:
                raise EngineCallError(f"{call.method} {call.path} answered 500: no")
            if call.path == "/v1/completions":
                if handle.garbled or handle.asleep:
                    raise EngineCallError(f"{call.method} {call.path} answered 500: CUDA error: an illegal memory "
                                          "access was encountered")
            elif "sleep" in call.path or "release" in call.path:
                handle.asleep = True
            elif ("wake" in call.path or "resume" in call.path) and not handle.stays_asleep:
                handle.asleep = False
        if handle.exit_after_wake and not handle.asleep:
            handle.exit(1, "segfault right after waking")
            for _ in range(3):  # its answer arrives after the exit has been seen
                await asyncio.sleep(0)

    async def is_sleeping(self, root_url: str, call: Call) -> bool | None:
        return self._handle(root_url).asleep
