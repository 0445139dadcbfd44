"""Routing a multipart/form-data request (RFC 7578) by its `model` field, in the bytes the proxy already holds.

OpenAI's audio transcriptions and translations and its image edits and variations are uploads: a form with a file
part and text fields, `model` among them. The proxy reads every body once, within max_body_bytes; a form is read
straight into a `FormBody` (a bytearray filled chunk by chunk, so a 20 MB upload is held once, never joined into a
second copy). `read_fields` then finds the fields the gateway routes by (`model`, `stream`) with one `find` for the
end of each part over that buffer: a file part is skipped, never copied or decoded. For an alias, `set_field`
writes the engine's own name over the `model` field's value in place; the boundary, the other parts and their
bytes are kept as they came.

Header parameters (the Content-Type's boundary, a part's Content-Disposition name and filename) are read as
python-multipart reads them, the parser of the FastAPI servers that vLLM and SGLang are (python_multipart/
multipart.py, `parse_options_header`): split at semicolons outside quoted strings, names case-insensitive, quotes
and backslash escapes removed, the RFC 2231 extended syntax (`name*=`) ignored since RFC 7578 4.2 forbids it in
forms, the last of a repeated parameter kept. Strict where the gateway and the engine must agree on what the form
says: a `model` or `stream` field that appears twice, comes as a file or is not UTF-8 is refused, as is a body that
is not a whole multipart body (no delimiter, a part without `Content-Disposition: form-data` and a name, no closing
delimiter). Guarded by tests/unit/gateway/test_forms.py and tests/integration/test_multipart.py.
"""

import re
from dataclasses import dataclass

from gateway import errors

# The OpenAI-style endpoints that take uploads: the only paths where a keyless gateway's door lets a form through
# (gateway/auth.py `Door`); on every path a form body is routed by its `model` field.
FORM_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits",
                        "/v1/images/variations"})

# The fields the gateway reads; any other field, and every file, is passed on unread.
ROUTING_FIELDS = ("model", "stream")

# RFC 2046 5.1.1: 1 to 70 characters from this set, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
# A part's header block; real ones are a few hundred bytes. Bounded so that a body with no blank line after its
# delimiter is refused after a short search, not a scan of the whole upload.
_HEADERS_MAX = 16 * 1024


class FormBody(bytearray):
    """A multipart/form-data request body as read, with the boundary of its Content-Type.

    A bytearray so that the proxy fills it in place while reading and an alias is written over the `model` field
    without a second buffer; json, aiohttp and `bytes.find` take it as they take bytes."""

    __slots__ = ("boundary", "fields")

    def __init__(self, boundary: bytes) -> None:
        super().__init__()
        self.boundary = boundary
        self.fields: dict[str, Field] = {}  # set by read_fields: the routing fields found


@dataclass(frozen=True, slots=True)
class Field:
    """A text field of the form: its value, and where its bytes lie in the body."""

    value: str
    start: int
    end: int


def is_form(content_type: bytes) -> bool:
    """multipart/form-data, parameters allowed (a slice and a compare: checked for every request body)."""
    return content_type[:19].lower() == b"multipart/form-data" and content_type[19:20] in (b"", b";", b" ", b"\t")


def boundary(content_type: bytes) -> bytes:
    """The boundary of a multipart/form-data Content-Type (quoted or not); a 400 without a valid one."""
    _, params = _parameters(content_type.decode("latin-1"))
    value = params.get("boundary")
    if value is None or not _BOUNDARY.fullmatch(value):
        raise errors.bad_form("the Content-Type names no valid boundary (1 to 70 characters, RFC 2046)")
    return value.encode("ascii")


def read_fields(body: FormBody) -> dict[str, Field]:
    """The routing fields of the form in `body` (also kept as `body.fields`); a 400 if it is not a whole form.

    Every part is walked to the closing delimiter, so that a second `model` field is seen wherever it is, but only a
    routing field's value is copied out of the buffer."""
    delimiter = b"--" + body.boundary
    # The first delimiter opens the body, or ends a preamble on a line of its own (RFC 2046 5.1.1).
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            raise errors.bad_form("the body has no delimiter of the boundary the Content-Type names")
        position = first + 2 + len(delimiter)
    found: dict[str, Field] = {}
    end = len(body)
    while True:
        if body[position:position + 2] == b"--":  # the closing delimiter: what follows is an epilogue
            body.fields = found
            return found
        while position < end and body[position] in b" \t":  # transport padding
            position += 1
        if body[position:position + 2] != b"\r\n":
            raise errors.bad_form("a delimiter is not followed by a line break")
        position += 2
        if body[position:position + 2] == b"\r\n":  # a part without headers
            headers, content = b"", position + 2
        else:
            blank = body.find(b"\r\n\r\n", position, position + _HEADERS_MAX)
            if blank < 0:
                raise errors.bad_form("a part's headers do not end with a blank line")
            headers, content = bytes(body[position:blank]), blank + 4
        close = body.find(b"\r\n" + delimiter, content)
        if close < 0:
            raise errors.bad_form("the body ends inside a part: no closing delimiter")
        name, is_file = _disposition(headers)
        if name in ROUTING_FIELDS:
            if name in found:
                raise errors.bad_form(f"the form has the field '{name}' twice")
            if is_file:
                raise errors.bad_form(f"the form's '{name}' is a file, not a field")
            try:
                value = body[content:close].decode("utf-8")
            except UnicodeDecodeError:
                raise errors.bad_form(f"the form's '{name}' field is not UTF-8") from None
            found[name] = Field(value, content, close)
        position = close + 2 + len(delimiter)


def set_field(body: FormBody, name: str, value: str) -> None:
    """Write `value` over the field `name` read by `read_fields`, in place: the rest of the body is kept byte for
    byte (the bytes after it move by the difference in length)."""
    field = body.fields[name]
    encoded = value.encode("utf-8")
    body[field.start:field.end] = encoded
    shift = len(encoded) - (field.end - field.start)
    body.fields = {other: Field(known.value, known.start + shift, known.end + shift) if known.start > field.start
                   else known for other, known in body.fields.items()}
    body.fields[name] = Field(value, field.start, field.start + len(encoded))


def _disposition(headers: bytes) -> tuple[str, bool]:
    """A part's field name and whether it is a file, from its Content-Disposition; a 400 without one."""
    for line in headers.split(b"\r\n"):
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == b"content-disposition":
            break
    else:
        raise errors.bad_form("a part has no Content-Disposition header")
    kind, params = _parameters(value.decode("latin-1"))
    if kind != "form-data":
        raise errors.bad_form("a part's Content-Disposition is not form-data")
    name = params.get("name")
    if not name:
        raise errors.bad_form("a part's Content-Disposition has no name")
    return name, "filename" in params


def _parameters(value: str) -> tuple[str, dict[str, str]]:
    """A header's value (lower case) and its parameters, read as python-multipart reads them (module docstring)."""
    segments: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            segments.append("".join(current))
            current = []
            continue
        current.append(char)
    segments.append("".join(current))
    params: dict[str, str] = {}
    for segment in segments[1:]:
        key, _, text = segment.strip().partition("=")
        key, text = key.strip().lower(), text.strip()
        if not key or "*" in key:
            continue
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1].replace("\\\\", "\\").replace('\\"', '"')
        params[key] = text
    return segments[0].strip().lower(), params
