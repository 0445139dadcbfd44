"""Cline's request pattern (both styles: Cline >= 4.1 sends native tools for any id; Cline <= 4.0 only for ids
it recognises, XML in the prompt otherwise): long agent turns, always streamed with `stream_options.include_usage`
(it shows tokens and cost from the final usage chunk) and with function `tools`; the model answers
with `tool_calls` deltas whose arguments arrive in fragments. The gateway must pass every chunk
through byte for byte, the usage chunk (empty `choices`) included."""

import json
from pathlib import Path

import httpx
import openai

from tests.clients.util import data_payloads, engine_stats
from tests.harness import fake_engine_spec, run_gateway, write_models

READ_FILE_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read the contents of a file at the specified path.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "The path of the file to read"},
                           "encoding": {"type": "string"}},
            "required": ["path"],
        },
    },
}
EXECUTE_TOOL = {
    "type": "function",
    "function": {"name": "execute_command", "description": "Run a CLI command.",
                 "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}},
}
SYSTEM = "You are Cline, a highly skilled software engineer. " * 40  # Cline's system prompt is long


def turn(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "<task>\nfix the failing test\n</task>"},
            {"role": "assistant", "content": "I will look at the repository first."},
            {"role": "user", "content": user}]


async def test_long_streamed_turn_with_usage_and_tool_calls_through_the_sdk(tmp_path: Path) -> None:
    models = write_models(tmp_path, fake_engine_spec("coder", "--token-delay", "0.005", aliases=["cline-model"]))
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)

        # A long text turn: every token, then the usage chunk as the last one before [DONE].
        stream = await sdk.chat.completions.create(
            model="cline-model", messages=turn("Summarise what you found."), max_tokens=300, stream=True,
            stream_options={"include_usage": True}, tools=[READ_FILE_TOOL, EXECUTE_TOOL])
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "".join(f" t{i}" for i in range(300))
        assert all(len(c.choices) == 1 and c.usage is None for c in chunks[:-1])
        assert chunks[-2].choices[0].finish_reason == "length"
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (4, 300, 304)

        # A tool turn: the model calls read_file; the deltas arrive as the engine sent them.
        stream = await sdk.chat.completions.create(
            model="cline-model", messages=turn("Use read_file to open tests/test_app.py"), max_tokens=300,
            stream=True, stream_options={"include_usage": True}, tools=[READ_FILE_TOOL, EXECUTE_TOOL])
        chunks = [chunk async for chunk in stream]
        first = chunks[0].choices[0].delta
        assert first.role == "assistant" and first.content is None
        assert first.tool_calls is not None and len(first.tool_calls) == 1
        call = first.tool_calls[0]
        assert (call.index, call.id, call.type, call.function.name, call.function.arguments) == (
            0, "call_fake_1", "function", "read_file", "")
        fragments = [c.choices[0].delta.tool_calls for c in chunks[1:-2]]
        assert len(fragments) > 2 and all(f is not None and len(f) == 1 and f[0].index == 0 for f in fragments)
        assert all(f[0].id is None and f[0].function.name is None for f in fragments)
        arguments = "".join(f[0].function.arguments for f in fragments)
        assert json.loads(arguments) == {"path": "fake-path", "encoding": "fake-encoding"}
        assert chunks[-2].choices[0].finish_reason == "tool_calls"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(chunks) - 1

        # Without include_usage nothing is added, and no usage field appears (the engine's choice).
        stream = await sdk.chat.completions.create(
            model="cline-model", messages=turn("Use execute_command to run pytest"), stream=True,
            tools=[READ_FILE_TOOL, EXECUTE_TOOL])
        chunks = [chunk async for chunk in stream]
        assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
        names = [tc.function.name for c in chunks for tc in c.choices[0].delta.tool_calls or [] if tc.function.name]
        assert names == ["execute_command"]
        stats = await engine_stats(gw, "coder")
        assert stats["tool_calls"] == 2 and stats["streams_completed"] == 3


async def test_sse_bytes_through_the_gateway_equal_the_engines_own(tmp_path: Path) -> None:
    # --created fixes the timestamp: two answers to the same request are byte-identical.
    models = write_models(tmp_path, fake_engine_spec("coder", "--token-delay", "0.002", "--created", "1700000000"))
    async with run_gateway(models) as gw, httpx.AsyncClient(timeout=30) as client:
        headers = {"Authorization": "Bearer unused", "Accept": "application/json",
                   "User-Agent": "OpenAI/JS 4.96.0"}  # Cline's OpenAI client
        await gw.waker.warm("coder")  # a cold stream starts with the gateway's own keep-alive comments
        bodies = [
            {"model": "coder", "messages": turn("Use read_file to open setup.py"), "max_tokens": 200,
             "stream": True, "stream_options": {"include_usage": True}, "tools": [READ_FILE_TOOL, EXECUTE_TOOL],
             "temperature": 0},
            {"model": "coder", "messages": turn("Keep going."), "max_tokens": 200, "stream": True,
             "stream_options": {"include_usage": True}, "tools": [READ_FILE_TOOL], "parallel_tool_calls": False},
        ]
        for body in bodies:
            via_gateway = await client.post(gw.v1 + "/chat/completions", json=body, headers=headers)
            assert via_gateway.status_code == 200
            api_base = gw.waker.controller("coder").handle.api_base
            direct = await client.post(api_base + "/chat/completions", json=body, headers=headers)
            assert direct.status_code == 200
            assert via_gateway.content == direct.content  # byte for byte: nothing added, dropped or reframed
            assert via_gateway.headers["content-type"] == direct.headers["content-type"]
            payloads = data_payloads(via_gateway.content)
            assert payloads[-1] == "[DONE]"
            assert payloads[-2]["choices"] == [] and payloads[-2]["usage"]["total_tokens"] > 4
            assert all(p["usage"] is None for p in payloads[:-2])


async def test_classic_cline_xml_tools_for_an_alias_and_native_tools_for_a_recognised_id(tmp_path: Path) -> None:
    """Cline <= 4.0 sends native `tools` only for model ids it recognises (`gpt-oss...`: utils/model-utils.ts); for an
    alias such as `brain` it puts XML tool instructions in the system prompt and sends no `tools`. Both reach the
    engine as sent: the gateway neither adds nor drops a `tools` field, whatever name routed the request."""
    models = write_models(tmp_path, fake_engine_spec("gpt-oss-120b", "--token-delay", "0.001", aliases=["brain"]))
    xml_system = SYSTEM + ("\n\nTOOL USE\n\nYou have access to a set of tools... Tool use is formatted using XML-style "
                           "tags:\n<read_file>\n<path>File path here</path>\n</read_file>")
    async with run_gateway(models) as gw:
        sdk = openai.AsyncOpenAI(base_url=gw.v1, api_key="unused", max_retries=0, timeout=60)
        # Classic Cline with the alias: XML in the prompt, no tools; the answer is plain text deltas.
        messages = [{"role": "system", "content": xml_system}, *turn("Use read_file to open setup.py")[1:]]
        stream = await sdk.chat.completions.create(model="brain", messages=messages, max_tokens=20, stream=True,
                                                   stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        assert all(c.choices[0].delta.tool_calls is None for c in chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        # The real id, recognised as gpt-oss: native tools, answered with tool_calls.
        stream = await sdk.chat.completions.create(
            model="gpt-oss-120b", messages=turn("Use read_file to open setup.py"), max_tokens=20, stream=True,
            stream_options={"include_usage": True}, tools=[READ_FILE_TOOL, EXECUTE_TOOL])
        chunks = [chunk async for chunk in stream]
        names = [tc.function.name for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []
                 if tc.function.name]
        assert names == ["read_file"]
        stats = await engine_stats(gw, "gpt-oss-120b")
        assert stats["tool_calls"] == 1  # only the request that carried tools got a tool call
        assert gw.starts("gpt-oss-120b") == 1  # the alias and the id are one engine
