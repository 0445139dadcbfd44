"""What can go wrong in the waker; the gateway maps each to an OpenAI error in one place."""


class WakerError(Exception):
    """Base of every error the waker reports to a caller."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.model = model


class ModelNotFound(WakerError):
    pass


class StartFailed(WakerError):
    """The engine could not be started or exited before it was ready."""

    def __init__(
        self,
        message: str,
        *,
        model: str,
        exit_code: int | None = None,
        log_tail: tuple[str, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, model=model)
        self.exit_code = exit_code
        self.log_tail = log_tail
        self.retry_after = retry_after


class StartTimeout(StartFailed):
    """The engine did not become ready within its start_timeout."""


class ShuttingDown(WakerError):
    """The gateway is stopping and takes no new work."""


class QueueFull(WakerError):
    """Too many requests already wait for room."""


class NoRoom(WakerError):
    """No room could be made in time (max_wait), or ever (pinned models hold too much)."""

    def __init__(self, message: str, *, model: str, retry_after: float | None = None) -> None:
        super().__init__(message, model=model)
        self.retry_after = retry_after


class WakeFailed(StartFailed):
    """A sleeping engine could not be woken."""


class Withdrawn(WakerError):
    """A request's place in a queue was taken away (models.d removed or re-placed its model, or its start could not
    begin): the request asks again, and then learns why (ModelNotFound, ShuttingDown) or queues afresh."""
