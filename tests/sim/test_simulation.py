"""The simulation (tests/sim/machine.py): random steps of requests, admin operations, reloads, faults, outages and
gateway restarts against the real waker, in virtual time, with its invariants checked after every step.

CI runs a fixed budget with a fixed seed (reproducible, no example database). A long local search:

    SPARKGATE_SIM_EXAMPLES=500 SPARKGATE_SIM_STEPS=50 SPARKGATE_SIM_RANDOM=1 \\
        .venv/bin/python -m pytest tests/sim/test_simulation.py -x -q

SPARKGATE_SIM_RANDOM=1 searches from a random seed each run and keeps failures in .hypothesis/ to replay them
first next time; a failure prints its shrunk steps, the stuff of a regression test in test_regressions.py.
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.sim.machine import WakerSimulation

EXAMPLES = int(os.environ.get("SPARKGATE_SIM_EXAMPLES", "25"))
STEPS = int(os.environ.get("SPARKGATE_SIM_STEPS", "30"))
RANDOM = os.environ.get("SPARKGATE_SIM_RANDOM", "") not in ("", "0")
LONG = "SPARKGATE_SIM_EXAMPLES" in os.environ or "SPARKGATE_SIM_STEPS" in os.environ


@pytest.mark.timeout(0 if LONG else 300)
def test_the_waker_keeps_its_invariants_through_random_steps() -> None:
    run_state_machine_as_test(WakerSimulation, settings=settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        derandomize=not RANDOM,
        database=settings.default.database if RANDOM else None,
        phases=tuple(Phase) if RANDOM else (Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        print_blob=RANDOM,
    ))
