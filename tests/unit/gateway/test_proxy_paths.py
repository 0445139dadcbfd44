"""Which request paths may reach an engine, and the engine URL built from them (gateway/proxy.py), without I/O."""

import time

import pytest

from gateway.errors import ApiError
from gateway.proxy import _check_query, _connection_options, _engine_path, _engine_target


def scope(raw_path: bytes, path: str = "/v1/decoded") -> dict[str, object]:
    return {"raw_path": raw_path, "path": path}


@pytest.mark.parametrize(("raw", "forwarded"), [
    (b"/v1/chat/completions", "/chat/completions"),
    (b"/v1/embeddings", "/embeddings"),
    (b"/v1/responses/resp_1/cancel", "/responses/resp_1/cancel"),
    (b"/v1/a%3Bb/x.y", "/a%3Bb/x.y"),  # kept encoded: the engine decodes it once, as the client meant
    (b"/v1/%252e%252e", "/%252e%252e"),  # a literal "%2e%2e" segment for the engine, never a dot segment
    (b"/v1/...", "/..."),  # three dots are a name
    (b"/v1/.well-known/x", "/.well-known/x"),
])
def test_normalised_paths_under_v1_are_forwarded_as_sent(raw: bytes, forwarded: str) -> None:
    assert _engine_path(scope(raw)) == forwarded


@pytest.mark.parametrize("raw", [
    b"/v1/../sleep", b"/v1/./x", b"/v1/x/..", b"/v1/x/.", b"/v1/%2e%2e/sleep", b"/v1/%2E%2E/sleep", b"/v1/.%2e/x",
    b"/v1/%2E./x", b"/v1/%2e/x", b"/v1/a%2eb",  # an encoded dot, anywhere
    b"/v1/..%2fsleep", b"/v1/..%2Fsleep", b"/v1/..%5csleep", b"/v1/..%5Csleep", b"/v1/..\\sleep", b"/v1/a\\b",
    b"/v1//x", b"/v1/x//y", b"/v1/x/", b"/v1/", b"/v1", b"/v1x/y", b"/v2/x", b"/x/../v1/chat/completions",
    b"/%76%31/chat/completions",  # "/v1" itself must be literal
    b"/v1/x%00", b"/v1/x%1f", b"/v1/x%0A", b"/v1/x%7f", b"/v1/x\x00", b"/v1/x\x7f", b"/v1/x\x1b",
    b"/v1/\xc3\xa9", b"/v1/a%2", b"/v1/a%zz", b"/v1/a b",
])
def test_anything_else_is_a_400_before_anything_happens(raw: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        _engine_path(scope(raw))
    assert refused.value.status == 400 and refused.value.code == "invalid_path"


def test_the_decoded_path_is_checked_when_a_server_gives_no_raw_path() -> None:
    assert _engine_path({"path": "/v1/chat/completions"}) == "/chat/completions"
    with pytest.raises(ApiError):
        _engine_path({"raw_path": None, "path": "/v1/../sleep"})


def test_a_long_path_that_fails_at_its_end_is_refused_in_linear_time() -> None:
    raw = b"/v1/" + b"a" * 100_000 + b"\\"
    began = time.perf_counter()
    with pytest.raises(ApiError):
        _engine_path(scope(raw))
    assert time.perf_counter() - began < 0.5  # a backtracking pattern takes minutes on 30 characters


@pytest.mark.parametrize(("api_base", "path", "query", "address", "host", "target"), [
    ("http://127.0.0.1:8000/v1", "/chat/completions", b"", ("127.0.0.1", 8000, False), b"127.0.0.1:8000",
     b"/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1/", "/chat/completions", None, ("127.0.0.1", 8000, False), b"127.0.0.1:8000",
     b"/v1/chat/completions"),
    ("http://h:1/engine/v1", "/a%3Bb", b"x=%2e%2e&y=a%20b", ("h", 1, False), b"h:1",
     b"/engine/v1/a%3Bb?x=%2e%2e&y=a%20b"),
    ("http://h:1", "/chat/completions", None, ("h", 1, False), b"h:1", b"/chat/completions"),
    ("http://[::1]:8000/v1", "/embeddings", None, ("::1", 8000, False), b"[::1]:8000", b"/v1/embeddings"),
    ("https://api.example.com/v1", "/embeddings", None, ("api.example.com", 443, True), b"api.example.com",
     b"/v1/embeddings"),
    ("http://user:pw@h/v1", "/embeddings", None, ("h", 80, False), b"h", b"/v1/embeddings"),
    ("http://h:1/m\u00fcde/v1", "/embeddings", None, ("h", 1, False), b"h:1", b"/m%C3%BCde/v1/embeddings"),
])
def test_the_engine_target_is_built_from_parts_and_keeps_the_bytes(
        api_base: str, path: str, query: bytes | None, address: tuple[str, int, bool], host: bytes,
        target: bytes) -> None:
    assert _engine_target(api_base, path, query)[:3] == (address, host, target)


def test_credentials_in_an_engine_url_are_sent_as_basic_auth() -> None:
    assert _engine_target("http://us%40er:p%3Aw@h:1/v1", "/x", None)[3] == b"Basic dXNAZXI6cDp3"  # us@er:p:w
    assert _engine_target("http://h:1/v1", "/x", None)[3] is None


def test_an_engine_url_with_a_port_that_is_not_one_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        _engine_target("http://h:99999/v1", "/x", None)


@pytest.mark.parametrize("query", [b"a=b c", b"a=\r\nX-Injected: 1", b"a=\x00", b"a=\xc3\xa9", b"a=\x7f"])
def test_a_query_that_could_not_be_written_as_sent_is_a_400(query: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        _check_query({"query_string": query})
    assert refused.value.status == 400


def test_a_printable_query_passes() -> None:
    _check_query({"query_string": b"api-version=2024-02-01&x=%20%2F"})
    _check_query({"query_string": b""})


def test_connection_options_are_lowercased_names_of_every_connection_header() -> None:
    assert _connection_options([b"close, X-Secret", b" x-other ,, Keep-Alive"]) == {
        b"close", b"x-secret", b"x-other", b"keep-alive"}
    assert _connection_options([b"", b" , "]) == frozenset()
