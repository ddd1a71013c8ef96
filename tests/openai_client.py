"""Drives my-claw's OpenAI-compatible API with the official `openai` Python client.

Usage: python openai_client.py BASE_URL API_KEY
Prints one JSON object with what it observed; tests/gateway.rs checks it.
"""

import json
import sys

import openai
from openai import OpenAI


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=base_url, api_key=api_key, timeout=90, max_retries=0)
    result = {"openai_version": openai.__version__}

    result["models"] = [m.id for m in client.models.list()]

    stream = client.chat.completions.create(
        model="main",
        messages=[{"role": "user", "content": "Write one short sentence about the sea."}],
        stream=True,
        max_tokens=24,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    result.update(
        text="".join(pieces),
        chunks=chunks,
        content_chunks=len(pieces),
        finish=finish,
        usage=usage,
    )

    full = client.chat.completions.create(
        model="fast",
        messages=[
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Name a color."},
        ],
        max_tokens=8,
    )
    result["non_stream_text"] = full.choices[0].message.content
    result["non_stream_finish"] = full.choices[0].finish_reason

    try:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
        result["unknown_model_status"] = 200
    except openai.APIStatusError as err:
        result["unknown_model_status"] = err.status_code

    try:
        OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
        result["bad_key_status"] = 200
    except openai.APIStatusError as err:
        result["bad_key_status"] = err.status_code

    print(json.dumps(result))


if __name__ == "__main__":
    main()
