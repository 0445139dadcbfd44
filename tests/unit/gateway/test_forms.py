"""gateway/forms.py: the routing fields of a multipart/form-data body, found in the bytes held, and the `model` field
written over in place. Forms are built by httpx, the multipart encoder the OpenAI SDK uses, and by hand where a
client could send something httpx never would."""

import hashlib

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import forms
from gateway.errors import ApiError


def encoded(data: dict[str, str], files: dict[str, tuple[str, bytes, str]], boundary: bytes = b"b0und4ry"
            ) -> forms.FormBody:
    """The body httpx sends for `data` and `files`, as the proxy holds it."""
    request = httpx.Request("POST", "http://x/", data=data, files=files, headers={
        "content-type": "multipart/form-data; boundary=" + boundary.decode()})
    body = forms.FormBody(forms.boundary(request.headers["content-type"].encode()))
    body += request.read()
    return body


def raw(text: bytes, boundary: bytes = b"XyZ") -> forms.FormBody:
    body = forms.FormBody(boundary)
    body += text
    return body


def refused(body: forms.FormBody) -> ApiError:
    with pytest.raises(ApiError) as caught:
        forms.read_fields(body)
    assert caught.value.status == 400
    return caught.value


def test_the_model_and_stream_fields_are_found_and_the_file_is_left_alone() -> None:
    audio = bytes(range(256)) * 4000  # every byte value, CR and LF and "--" among them
    body = encoded({"model": "whisper", "stream": "true", "language": "de"}, {"file": ("a.wav", audio, "audio/wav")})
    fields = forms.read_fields(body)
    assert {name: field.value for name, field in fields.items()} == {"model": "whisper", "stream": "true"}
    assert bytes(body[fields["model"].start:fields["model"].end]) == b"whisper"


@pytest.mark.parametrize("name", ["w", "whisper-large-v3-turbo-with-a-much-longer-served-name", "wh\u00efsper"])
def test_an_alias_is_rewritten_in_place_and_every_other_byte_is_kept(name: str) -> None:
    audio = hashlib.sha256(b"seed").digest() * 1000
    body = encoded({"model": "alias", "prompt": "keep me", "stream": "false"}, {"file": ("a.wav", audio, "audio/wav")})
    forms.read_fields(body)
    forms.set_field(body, "model", name)
    expected = encoded({"model": name, "prompt": "keep me", "stream": "false"},
                       {"file": ("a.wav", audio, "audio/wav")})
    assert bytes(body) == bytes(expected)
    # The spans moved with the bytes: the fields read again are where set_field says they are.
    again = forms.read_fields(body)
    assert {k: (v.value, v.start, v.end) for k, v in again.items()} == {
        k: (v.value, v.start, v.end) for k, v in body.fields.items()}


def test_a_preamble_and_an_epilogue_are_allowed() -> None:
    body = raw(b"ignored preamble\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--\r\n"
               b"epilogue")
    assert forms.read_fields(body)["model"].value == "m"


@pytest.mark.parametrize(("disposition", "name"), [
    ('form-data; NAME="model"', "model"),  # parameter names are case-insensitive
    ('form-data; name="a;b"; filename="x"', "a;b"),  # a semicolon inside quotes
    ('form-data; name="x"; name*=UTF-8\'\'model', "x"),  # RFC 2231 syntax ignored (RFC 7578 4.2), as python-multipart
    ('form-data; name=x; name=model', "model"),  # the last one, as python-multipart
    ('Form-Data ; name="mo\\"del"', 'mo"del'),
])
def test_part_names_are_read_as_python_multipart_reads_them(disposition: str, name: str) -> None:
    assert forms._disposition(f"Content-Disposition: {disposition}".encode())[0] == name
    body = raw(f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\nvalue\r\n--XyZ--".encode())
    assert {k: v.value for k, v in forms.read_fields(body).items()} == ({"model": "value"} if name == "model" else {})


@pytest.mark.parametrize(("text", "detail"), [
    (b"no delimiter at all", "no delimiter"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n", "no closing delimiter"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm", "no closing delimiter"),
    (b"--XyZ\r\nContent-Type: text/plain\r\n\r\nm\r\n--XyZ--", "no Content-Disposition"),
    (b"--XyZ\r\nContent-Disposition: attachment; name=\"model\"\r\n\r\nm\r\n--XyZ--", "not form-data"),
    (b"--XyZ\r\nContent-Disposition: form-data\r\n\r\nm\r\n--XyZ--", "no name"),
    (b"--XyZjunk\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--", "line break"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"" + b" " * 20_000, "blank line"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n"
     b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nb\r\n--XyZ--", "twice"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.txt\"\r\n\r\nm\r\n--XyZ--", "a file"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n\xff\xfe\r\n--XyZ--", "not UTF-8"),
], ids=["no-delimiter", "unclosed", "truncated", "no-disposition", "attachment", "no-name", "bad-delimiter-line",
        "endless-headers", "model-twice", "model-as-file", "not-utf8"])
def test_what_the_gateway_and_the_engine_could_read_differently_is_refused(text: bytes, detail: str) -> None:
    error = refused(raw(text))
    assert error.code == "invalid_multipart" and detail in error.message, error.message


@pytest.mark.parametrize(("content_type", "boundary"), [
    (b"multipart/form-data; boundary=abc", b"abc"),
    (b'Multipart/Form-Data; charset=utf-8; boundary="a b:c"', b"a b:c"),
    (b"multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW", b"----WebKitFormBoundary7MA4YWxkTrZu0gW"),
])
def test_the_boundary_is_read_from_the_content_type(content_type: bytes, boundary: bytes) -> None:
    assert forms.is_form(content_type)
    assert forms.boundary(content_type) == boundary


@pytest.mark.parametrize("content_type", [b"multipart/form-data", b"multipart/form-data; boundary=",
                                          b"multipart/form-data; boundary=" + b"x" * 71,
                                          b'multipart/form-data; boundary="ends in a space "'])
def test_a_content_type_without_a_valid_boundary_is_a_400(content_type: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        forms.boundary(content_type)
    assert (caught.value.status, caught.value.code) == (400, "invalid_multipart")


def test_only_multipart_form_data_is_a_form() -> None:
    assert not forms.is_form(b"application/json")
    assert not forms.is_form(b"multipart/mixed; boundary=x")
    assert not forms.is_form(b"application/x-www-form-urlencoded")


field_names = st.sampled_from(["model", "stream", "prompt", "language", "file", "x"])
field_values = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(field_names, field_values), max_size=5),
       files=st.lists(st.binary(max_size=300), min_size=1, max_size=3))  # httpx: no file, no form
def test_any_form_httpx_builds_reads_back_as_it_was_sent(fields: list[tuple[str, str]], files: list[bytes]) -> None:
    data: dict[str, str] = {}
    for name, value in fields:
        data.setdefault(name, value)
    uploads = {f"upload{i}": (f"f{i}.bin", content, "application/octet-stream") for i, content in enumerate(files)}
    body = encoded(data, uploads)
    found = forms.read_fields(body)
    assert {name: field.value for name, field in found.items()} == {
        name: value for name, value in data.items() if name in forms.ROUTING_FIELDS}
    assert all(bytes(body[field.start:field.end]).decode() == field.value for field in found.values())


@settings(max_examples=500, deadline=None)
@given(prefix=st.binary(max_size=200), cut=st.integers(0, 400), noise=st.binary(max_size=20))
def test_any_bytes_are_a_form_or_a_400_never_another_error(prefix: bytes, cut: int, noise: bytes) -> None:
    base = bytes(encoded({"model": "m", "stream": "false"}, {"file": ("a", b"abc\r\n--b0und4ry", "x/y")}))
    # A real form cut, spliced with noise, or noise alone.
    text = prefix + base[:cut] + noise + base[cut + len(noise):]
    body = forms.FormBody(b"b0und4ry")
    body += text
    try:
        forms.read_fields(body)
    except ApiError as error:
        assert error.status == 400
