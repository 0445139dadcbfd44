"""A scripted engine on a raw socket, for tests of the proxy's HTTP client (gateway/upstream.py)."""

import asyncio


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (the gateway always says Content-Length), b"" when the client closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    return head + await reader.readexactly(length)
