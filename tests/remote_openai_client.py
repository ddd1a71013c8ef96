"""Drives my-claw's /v1 with the official `openai` Python client while the `smart` tier is a
remote OpenAI-compatible server (a stand-in started by tests/remote.rs).

Usage: python remote_openai_client.py BASE_URL API_KEY [--tools]
Prints one JSON object with what it observed; tests/remote.rs checks it. With --tools it also
makes a tool-call round trip: the client declares `get_weather`, my-claw passes the remote
model's streamed call back as `tool_calls`, and the client's result goes back as a `tool`
message.
"""

import json
import sys

from openai import OpenAI

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def stream_text(client, **kwargs):
    """Streams one completion: its text, its finish reason, and its tool calls by index."""
    stream = client.chat.completions.create(model="smart", stream=True, **kwargs)
    pieces, finish, calls = [], None, {}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                pieces.append(delta.content)
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                if call.id:
                    slot["id"] = call.id
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
            if choice.finish_reason:
                finish = choice.finish_reason
    return "".join(pieces), finish, [calls[i] for i in sorted(calls)]


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    with_tools = "--tools" in sys.argv[3:]
    client = OpenAI(base_url=base_url, api_key=api_key, timeout=90, max_retries=0)
    result = {}

    messages = [{"role": "user", "content": "Say hello"}]
    text, finish, _ = stream_text(client, messages=messages, max_tokens=32)
    result.update(text=text, finish=finish)

    if with_tools:
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        _, tool_finish, calls = stream_text(
            client, messages=messages, tools=TOOLS, tool_choice="auto", max_tokens=64
        )
        result["tool_finish"] = tool_finish
        if calls:
            call = calls[0]
            result["tool_call"] = {
                "id": call["id"],
                "name": call["name"],
                "arguments": json.loads(call["arguments"]),
            }
            messages.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": call["arguments"]},
                        }
                    ],
                }
            )
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny"}'}
            )
            final_text, _, _ = stream_text(client, messages=messages, tools=TOOLS, max_tokens=64)
            result["final_text"] = final_text

    print(json.dumps(result))


if __name__ == "__main__":
    main()
