"""Waker tunables, set once by whoever builds the waker (the gateway passes its settings in)."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WakerOptions:
    probe_interval: float = 0.05  # seconds between readiness probes (DESIGN: <= 100 ms; bench/wake.py)
    probe_timeout: float = 2.0  # each probe's own limit, so a hung engine can't stall the loop
    reap_interval: float = 1.0  # how often idle models are looked for
    log_tail_lines: int = 40  # lines of engine output quoted in errors
    backoff_cap: float = 300.0  # longest wait between start attempts of a crash-looping model
    stable_after: float = 60.0  # READY this long before a crash: the failure count starts over
    stop_retry: float = 30.0  # keep trying to stop an engine this long while its runtime is unreachable
    rediscover_interval: float = 30.0  # look for engines nobody tracks (e.g. on a node unreachable at boot)
