"""`sparkgate warm` decides from what the admin API says: a scripted admin API, a fake clock, no sleeps. Only the
outcomes of the start it asked for end it (tests/integration/test_warm_admission.py runs it against a gateway)."""

import io
from typing import Any

from gateway.client import AdminClient, warm


def model(state: str, starts: int, outcome: str | None = None, attempt: int = 0, **fields: Any) -> dict[str, Any]:
    admission = {"outcome": outcome, "reason": fields.pop("reason", None), "attempt": attempt,
                 "position": fields.pop("position", None), "waiting_for": fields.pop("waiting_for", [])}
    return {"name": "m", "aliases": [], "state": state, "starts": starts, "admission": admission,
            "last_error": fields.pop("last_error", None), "log_tail": fields.pop("log_tail", []), **fields}


class ScriptedAdmin(AdminClient):
    """Answers the start with `answer`, then each look at /admin/state with the next of `states` (the last one
    again once they run out)."""

    def __init__(self, answer: dict[str, Any], *states: dict[str, Any]) -> None:
        super().__init__("http://gateway", None)
        self.answer = answer
        self.states = list(states)
        self.looks = 0

    def call(self, method: str, path: str, timeout: float = 30) -> Any:
        if path.endswith("/start"):
            return self.answer
        if path.endswith("/logs?lines=1"):
            return {"lines": ["loading weights..."]}
        assert path == "/admin/state"
        self.looks += 1
        return {"models": [self.states[min(self.looks, len(self.states)) - 1]], "nodes": {}}


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def follow(admin: ScriptedAdmin, limit: float = 60) -> tuple[int, str]:
    out, fake = io.StringIO(), FakeTime()
    code = warm(admin, "m", out, follow=True, limit=limit, interval=1, clock=fake.clock, sleep=fake.sleep)
    return code, out.getvalue()


QUEUED = {"outcome": "queued", "attempt": 3, "position": 2, "waiting_for": ["a", "b"]}
# The answer to a start of a model whose start 1 failed and whose ask 2 was refused: it follows ask 3 and start 2.
ANSWER = {"model": "m", "state": "failed", "admission": QUEUED, "attempt": {"admission": 3, "start": 2}}


def test_an_old_failure_and_an_old_refusal_do_not_end_a_warm_that_waits_then_starts() -> None:
    old = {"last_error": "m exited with code 2"}
    code, text = follow(ScriptedAdmin(ANSWER, model("failed", 1, "refused", 2, reason="max_wait passed", **old),
                                      model("failed", 1, **QUEUED, **old),
                                      model("starting", 2, "admitted", 3, **old), model("ready", 2, "admitted", 3)))
    assert code == 0
    assert text.splitlines() == ["m: waiting to start (an earlier start failed)  (0.0s)",
                                 "m: queued for memory behind a, b (position 2)  (1.0s)",
                                 "m: starting  loading weights...  (2.0s)",
                                 "m: ready after 3.0s"]


def test_a_warm_whose_ask_is_refused_ends_at_once_with_the_reason() -> None:
    admin = ScriptedAdmin(ANSWER, model("failed", 1, **QUEUED),
                          model("failed", 1, "refused", 3, reason="m needs 60 GB; ... Waited 600s"))
    code, text = follow(admin)
    assert code == 1 and admin.looks == 2
    assert text.splitlines()[-1] == "m: refused: m needs 60 GB; ... Waited 600s"


def test_a_warm_whose_own_start_fails_ends_with_its_reason_and_last_lines() -> None:
    code, text = follow(ScriptedAdmin(ANSWER, model("starting", 2, "admitted", 3),
                                      model("failed", 2, "admitted", 3, last_error="m exited with code 1",
                                            log_tail=["error: no GPU"])))
    assert code == 1
    assert text.splitlines()[-2:] == ["m: failed: m exited with code 1", "  error: no GPU"]


def test_a_warm_whose_start_was_stopped_before_it_was_ready_ends() -> None:
    code, text = follow(ScriptedAdmin(ANSWER, model("starting", 2, "admitted", 3), model("stopped", 2, "admitted", 3)))
    assert code == 1 and text.endswith("m: stopped before it was ready\n")


def test_a_warm_still_queued_at_its_limit_gives_up_and_says_so_once() -> None:
    admin = ScriptedAdmin(ANSWER, model("failed", 1, **QUEUED))
    code, text = follow(admin, limit=10)
    assert code == 1 and admin.looks == 10
    # A line when something changes, not one per look.
    assert text.splitlines() == ["m: queued for memory behind a, b (position 2)  (0.0s)",
                                 "m: still not ready after 10s"]
