"""/metrics after known traffic through a running gateway."""

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import fake_engine_spec, run_gateway, write_models


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_requests_cold_starts_states_and_budget(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("m", memory_gb=10), fake_engine_spec("idle", memory_gb=5))
    keys = [{"key": "sk-metrics-01", "name": "laptop"}]
    async with run_gateway(models, api_keys=keys, metrics_loopback_open=True) as gw, \
            httpx.AsyncClient(timeout=30) as client:
        auth = {"Authorization": "Bearer sk-metrics-01"}
        for _ in range(3):
            await client.post(gw.v1 + "/chat/completions", headers=auth, json={"model": "m", "messages": []})
        await client.post(gw.v1 + "/chat/completions", headers=auth,
                          json={"model": "m", "messages": [], "stream": True, "max_tokens": 2})
        await client.post(gw.v1 + "/chat/completions", headers=auth, json={"model": "nope", "messages": []})
        await client.post(gw.v1 + "/chat/completions", json={"model": "m", "messages": []})  # no key
        text = (await client.get(gw.url + "/metrics")).text
        values = samples(text)

        assert values[("sparkgate_requests_total", (("key", "laptop"), ("model", "m"), ("status", "200")))] == 4
        assert values[("sparkgate_requests_total", (("key", "laptop"), ("model", "-"), ("status", "404")))] == 1
        assert values[("sparkgate_requests_total", (("key", "-"), ("model", "-"), ("status", "401")))] == 1
        assert values[("sparkgate_time_to_first_byte_seconds_count", (("model", "m"),))] == 4
        assert values[("sparkgate_request_duration_seconds_count", (("model", "m"),))] == 4
        assert values[("sparkgate_cold_starts_total", (("model", "m"),))] == 1
        assert values[("sparkgate_cold_starts_total", (("model", "idle"),))] == 0
        assert values[("sparkgate_model_state", (("model", "m"), ("state", "ready")))] == 1
        assert values[("sparkgate_model_state", (("model", "m"), ("state", "stopped")))] == 0
        assert values[("sparkgate_budget_used_gb", (("node", "local"),))] == 10
        assert values[("sparkgate_budget_total_gb", (("node", "local"),))] == 120
        assert values[("sparkgate_model_memory_declared_gb", (("model", "idle"),))] == 5
        assert ("sparkgate_wake_duration_seconds_count", (("kind", "start"), ("model", "m"))) in values
