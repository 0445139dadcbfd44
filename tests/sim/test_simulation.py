"""The simulation (tests/sim/machine.py): random steps of requests, admin operations, reloads, faults, outages and
gateway restarts against the real waker, in virtual time, with its invariants checked after every step.

CI runs a fixed budget with a fixed seed (derandomized: the same runs every time, no example database): 200 runs
of 50 steps, about 40 s on a 2-core machine. A long local search from a random seed:

    SPARKGATE_SIM_EXAMPLES=1000 SPARKGATE_SIM_STEPS=60 SPARKGATE_SIM_RANDOM=1 \\
        .venv/bin/python -m pytest tests/sim/test_simulation.py -x -q -p no:logging

(about 3 minutes when it finds nothing). SPARKGATE_SIM_RANDOM=1 keeps failures in .hypothesis/ and replays them
first next time, and prints a @reproduce_failure blob; a failure prints its shrunk steps, which become a named
scenario in test_regressions.py. `--hypothesis-show-statistics` shows which transitions and outcomes the runs
went through (machine.py, `_report_coverage`).
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.sim.machine import WakerSimulation

EXAMPLES = int(os.environ.get("SPARKGATE_SIM_EXAMPLES", "200"))
STEPS = int(os.environ.get("SPARKGATE_SIM_STEPS", "50"))
RANDOM = os.environ.get("SPARKGATE_SIM_RANDOM", "") not in ("", "0")
LONG = "SPARKGATE_SIM_EXAMPLES" in os.environ or "SPARKGATE_SIM_STEPS" in os.environ


pytestmark = pytest.mark.timeout(0 if LONG else 300)

# A unittest case run by pytest (so `--hypothesis-show-statistics` reports on it): its one test, runTest, runs the
# state machine with these settings.
TestTheWakerKeepsItsInvariantsThroughRandomSteps = WakerSimulation.TestCase
TestTheWakerKeepsItsInvariantsThroughRandomSteps.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not RANDOM,
    database=settings.default.database if RANDOM else None,
    phases=tuple(Phase) if RANDOM else (Phase.generate, Phase.shrink),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    print_blob=RANDOM,
)
