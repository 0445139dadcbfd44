"""API keys: parsing, matching, model globs, loading from a file."""

from pathlib import Path

import pytest

from gateway.auth import ANONYMOUS, ApiKeySpec, AuthError, KeyRing, is_loopback, load_keys

RING = KeyRing([ApiKeySpec(key="sk-laptop-123", name="laptop", models=["qwen*", "embed"]),
                ApiKeySpec(key="sk-server-456", name="server")], admin_key="admin-secret-1")


def test_valid_bearer_key_names_its_caller() -> None:
    caller = RING.caller("Bearer sk-laptop-123")
    assert caller is not None and caller.name == "laptop"
    assert RING.caller("bearer   sk-server-456").name == "server"  # type: ignore[union-attr]


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong-key", "Basic sk-laptop-123", "sk-laptop-123"])
def test_missing_or_wrong_key_is_refused(header: str | None) -> None:
    assert RING.caller(header) is None


def test_model_globs_apply_to_the_name_asked_or_the_model_it_routes_to() -> None:
    laptop = RING.caller("Bearer sk-laptop-123")
    assert laptop is not None
    assert laptop.may_use("qwen3-coder") and laptop.may_use("embed")
    assert not laptop.may_use("gpt-oss-120b")
    assert laptop.may_use("coder-alias", "qwen3-coder")  # an alias of an allowed model


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


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_an_accepted_key_is_remembered_and_wrong_keys_are_never() -> None:
    ring = KeyRing([ApiKeySpec(key="sk-first-0001", name="one"), ApiKeySpec(key="sk-second-0002", name="two")])
    for _ in range(2):  # the second time from what was remembered
        assert ring.caller("Bearer sk-first-0001").name == "one"  # type: ignore[union-attr]
        assert ring.caller("Bearer sk-second-0002").name == "two"  # type: ignore[union-attr]
        assert ring.caller("Bearer sk-third-0003") is None
        assert ring.caller("Bearer sk-first-000") is None
    assert set(ring._accepted) == {"Bearer sk-first-0001", "Bearer sk-second-0002"}
