"""How long a failed model waits before the next start is tried."""


def retry_delay(failures: int, cap: float) -> float:
    """No wait after a single failure (one crash should not cost the user); then 2, 4, 8 ... s up to cap.

    A crash loop therefore backs off quickly instead of being retried hot.
    """
    if failures <= 1:
        return 0.0
    # The exponent is capped before the power: after 1025 failures 2.0 ** 1024 would overflow (a client
    # retrying through a long Docker outage gets there: tests/unit/test_backoff.py).
    return min(2.0 ** min(failures - 1, 62), cap)
