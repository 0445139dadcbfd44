"""API keys: parsing, matching, model globs, loading from a file."""

from pathlib import Path

import pytest

from gateway.auth import ANONYMOUS, ApiKeySpec, AuthError, Door, KeyRing, is_loopback, load_keys

RING = KeyRing([ApiKeySpec(key="sk-laptop-123", name="laptop", models=["qwen*", "embed"]),
                ApiKeySpec(key="sk-server-456", name="server")], admin_key="admin-secret-1")


def test_valid_bearer_key_names_its_caller() -> None:
    caller = RING.caller("Bearer sk-laptop-123")
    assert caller is not None and caller.name == "laptop"
    assert RING.caller("bearer   sk-server-456").name == "server"  # type: ignore[union-attr]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong-key", "Basic sk-laptop-123", "sk-laptop-123"])
def test_missing_or_wrong_key_is_refused(header: str | None) -> None:
    assert RING.caller(header) is None


def test_model_globs_apply_to_the_model_a_name_routes_to() -> None:
    laptop = RING.caller("Bearer sk-laptop-123")
    assert laptop is not None
    assert laptop.may_use("qwen3-coder") and laptop.may_use("embed")
    assert not laptop.may_use("gpt-oss-120b")
    assert laptop.may_use("coder-alias", "qwen3-coder")  # an alias of an allowed model


def test_a_glob_matching_an_alias_does_not_grant_the_model_behind_it() -> None:
    laptop = RING.caller("Bearer sk-laptop-123")
    assert laptop is not None
    # Alias "qwen-private" of the private model "big": the glob qwen* matches the alias, not the model.
    assert not laptop.may_use("qwen-private", "big")
    assert not laptop.may_use("embed", "big")  # even an alias spelled exactly as an allowed name


def test_metrics_need_the_admin_key_or_a_key_marked_metrics() -> None:
    ring = KeyRing([ApiKeySpec(key="sk-laptop-123", name="laptop"),
                    ApiKeySpec.model_validate({"key": "sk-prometheus-1", "name": "prom", "metrics": True})],
                   admin_key="admin-secret-1")
    assert ring.may_read_metrics("Bearer admin-secret-1") is True
    assert ring.may_read_metrics("Bearer sk-prometheus-1") is True
    assert ring.may_read_metrics("Bearer sk-laptop-123") is False
    assert ring.may_read_metrics(None) is None and ring.may_read_metrics("Bearer nope-nope") is None
    assert KeyRing([], admin_key="admin-secret-1").may_read_metrics(None) is None
    assert KeyRing([]).may_read_metrics(None) is True  # no keys at all: loopback only, as before
    assert not ApiKeySpec(key="sk-default-1").metrics


def test_no_keys_means_everyone_may_use_everything() -> None:
    assert KeyRing([]).caller(None) is ANONYMOUS
    assert not KeyRing([]).enabled


def test_admin_key_is_separate_from_client_keys() -> None:
    assert RING.is_admin("Bearer admin-secret-1")
    assert not RING.is_admin("Bearer sk-server-456")
    assert RING.caller("Bearer admin-secret-1") is None
    assert not KeyRing([]).is_admin("Bearer anything")


def test_keys_load_from_a_file_and_duplicates_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("- {key: sk-from-file-1, name: phone, models: ['small*']}\n")
    keys = load_keys([ApiKeySpec(key="sk-inline-1")], path)
    assert [k.name for k in keys] == ["client", "phone"]
    with pytest.raises(AuthError, match="twice"):
        load_keys([ApiKeySpec(key="sk-from-file-1")], path)
    path.write_text("key: not-a-list\n")
    with pytest.raises(AuthError, match="expected a list"):
        load_keys([], path)
    # A field given twice in one entry (which models wins?) is refused, as in models.d, not the last one taken.
    path.write_text("- key: sk-from-file-1\n  models: ['small*']\n  models: ['*']\n")
    with pytest.raises(AuthError, match="models"):
        load_keys([], path)
    path.write_bytes(b"- {key: \xff}\n")
    with pytest.raises(AuthError, match="not UTF-8"):
        load_keys([], path)


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert is_loopback("127.8.9.10") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("127.evil.example") and not is_loopback("::ffff:10.0.0.1")


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in values.items()]


def refused(door: Door, method: str, **values: str) -> str | None:
    error = door.refusal(method, headers(**values))
    return None if error is None else error.code


KEYLESS = Door("127.0.0.1", ["spark.lan"], ["http://webui.local"], json_only=True)


@pytest.mark.parametrize("host", ["127.0.0.1:8009", "localhost:8009", "LOCALHOST", "[::1]:8009", "app.localhost:8009",
                                  "spark.lan:8009", "Spark.LAN", "192.168.1.5:8009", "[fe80::1]:8009", "localhost.:80"])
def test_door_lets_in_this_gateways_hosts(host: str) -> None:
    assert refused(KEYLESS, "GET", host=host) is None


@pytest.mark.parametrize("host", ["evil.example:8009", "evil.example", "localhost.evil.example:8009",
                                  "127.0.0.1.nip.io:8009", "spark.lan.evil.example", "[evil]:80"])
def test_door_refuses_other_hosts(host: str) -> None:
    assert refused(KEYLESS, "GET", host=host) == "host_not_allowed"


def test_door_host_rules_follow_the_bound_host_and_a_wildcard() -> None:
    assert refused(Door("spark.home", [], [], json_only=False), "GET", host="spark.home:8009") is None
    assert refused(Door("127.0.0.1", ["*"], [], json_only=False), "GET", host="anything.example") is None


@pytest.mark.parametrize(("origin", "expected"), [
    ("http://127.0.0.1:8009", None),  # the gateway's own page (the status page)
    ("http://webui.local", None), ("http://webui.local/", None), ("HTTP://WEBUI.LOCAL", None),
    ("http://127.0.0.1:3000", "origin_not_allowed"),  # another local web app is another origin
    ("http://evil.example", "origin_not_allowed"), ("null", "origin_not_allowed"),
])
def test_door_checks_the_origin_against_its_own_and_the_listed_ones(origin: str, expected: str | None) -> None:
    assert refused(KEYLESS, "POST", host="127.0.0.1:8009", origin=origin) == expected
    assert refused(KEYLESS, "GET", host="127.0.0.1:8009", origin=origin) == expected


def test_door_leaves_preflights_to_cors_and_accepts_any_origin_when_told() -> None:
    assert refused(KEYLESS, "OPTIONS", host="127.0.0.1:8009", origin="http://evil.example") is None
    anyone = Door("127.0.0.1", [], ["*"], json_only=True)
    assert refused(anyone, "POST", host="127.0.0.1:8009", origin="http://evil.example") is None


@pytest.mark.parametrize(("content_type", "length", "expected"), [
    ("application/json", "12", None), ("application/json; charset=utf-8", "12", None),
    ("Application/JSON", "12", None), ("application/merge-patch+json", "12", None),
    (None, "0", None), (None, None, None), ("text/plain", "0", None),  # no body: admin POSTs
    ("text/plain", "12", "json_required"), ("application/x-www-form-urlencoded", "12", "json_required"),
    ("multipart/form-data; boundary=x", "12", "json_required"), ("", "12", "json_required"),
    (None, "12", None),  # no type declared: JSON assumed, as the proxy does (a browser's would carry an Origin)
    ("text/json", "12", "json_required"), ("application/jsonp", "12", "json_required"),
])
def test_door_of_a_keyless_gateway_takes_only_json_bodies(content_type: str | None, length: str | None,
                                                           expected: str | None) -> None:
    values = {"host": "127.0.0.1:8009"}
    if content_type is not None:
        values["content_type"] = content_type
    if length is not None:
        values["content_length"] = length
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert refused(KEYLESS, method, **values) == expected
    assert refused(KEYLESS, "GET", **values) is None


def test_door_refuses_a_chunked_non_json_body_and_leaves_bodies_to_the_proxy_with_keys() -> None:
    assert refused(KEYLESS, "POST", host="localhost", transfer_encoding="chunked",
                   content_type="text/plain") == "json_required"
    with_keys = Door("127.0.0.1", [], [], json_only=False)
    assert refused(with_keys, "POST", host="localhost", content_type="text/plain", content_length="12") is None


def test_an_accepted_key_is_remembered_and_wrong_keys_are_never() -> None:
    ring = KeyRing([ApiKeySpec(key="sk-first-0001", name="one"), ApiKeySpec(key="sk-second-0002", name="two")])
    for _ in range(2):  # the second time from what was remembered
        assert ring.caller("Bearer sk-first-0001").name == "one"  # type: ignore[union-attr]
        assert ring.caller("Bearer sk-second-0002").name == "two"  # type: ignore[union-attr]
        assert ring.caller("Bearer sk-third-0003") is None
        assert ring.caller("Bearer sk-first-000") is None
    assert set(ring._accepted) == {"Bearer sk-first-0001", "Bearer sk-second-0002"}
