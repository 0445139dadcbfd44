"""The app's background tasks: operations a request starts and does not wait for (an admin start, Open WebUI's
load, a SIGHUP reload). Each is kept in the app's set, so shutdown cancels it, and a failure other than the waker's
own (a refusal or a failed start, already in the model's state and events) is logged rather than lost."""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from waker.errors import WakerError

log = logging.getLogger("sparkgate.gateway")


def spawn(background: "set[asyncio.Task[None]]", operation: Coroutine[Any, Any, None],
          name: str) -> "asyncio.Task[None]":
    """`operation` as a task of `background`, removed from it when it ends."""
    task = asyncio.create_task(operation, name=name)
    background.add(task)
    task.add_done_callback(lambda done: _ended(background, done))
    return task


def _ended(background: "set[asyncio.Task[None]]", task: "asyncio.Task[None]") -> None:
    background.discard(task)
    if task.cancelled():
        return
    error = task.exception()  # read, so asyncio never reports it as unretrieved
    if error is not None and not isinstance(error, WakerError):
        log.error("%s failed", task.get_name(), exc_info=error)


__all__ = ["spawn"]
