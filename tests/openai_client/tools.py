"""Drives my-claw's `/v1` tool calling with the official `openai` Python client.

Usage: python tools.py BASE_URL API_KEY [RUNS]

(a) `tool_choice` naming a client function whose schema has a required enum and a required
    integer: RUNS calls at temperature 1, each answer's `tool_calls` arguments checked against
    the schema by hand; then the tool result goes back as a `role: "tool"` message and the
    answer must be text.
(b) `response_format: json_schema`: RUNS answers at temperature 1, each parsed and checked
    against the schema by hand.
(c) the same forced call streamed, accumulated by the client's own streaming helper
    (`client.chat.completions.stream`), and by hand from `create(stream=True)` deltas the
    way OpenAI documents them (by `index`, arguments concatenated).

Nothing here trusts the server: every check is made on what the client parsed. Prints one
JSON object with what it observed; tests/openai_tools.rs asserts on it. Only the standard
library and `openai` are used.
"""

import json
import sys

import openai
from openai import OpenAI

CITIES = ["Paris", "London", "Tokyo"]

FORECAST = {
    "type": "function",
    "function": {
        "name": "get_forecast",
        "description": "Get the weather forecast for a city for a number of days.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": CITIES},
                "days": {"type": "integer", "description": "How many days, from 1 to 7."},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}

# A second tool, so that naming one in `tool_choice` is a real choice.
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_temperature",
        "description": "Convert a temperature between Celsius and Fahrenheit.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "number"},
                "to": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["value", "to"],
        },
    },
}

MESSAGES = [
    {"role": "system", "content": "You are a weather assistant. Use the tools."},
    {"role": "user", "content": "What will the weather be like in Paris for the next 3 days?"},
]

REPORT_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": CITIES},
        "temperature_c": {"type": "integer"},
        "rain": {"type": "boolean"},
        "summary": {"type": "string", "maxLength": 60},
    },
    "required": ["city", "temperature_c", "rain", "summary"],
    "additionalProperties": False,
}


def is_int(value):
    # JSON true/false arrive as bool, a subclass of int in Python: not integers here.
    return isinstance(value, int) and not isinstance(value, bool)


def forecast_errors(arguments_text):
    """Why `arguments_text` is not valid for FORECAST's parameters ([] when it is)."""
    try:
        args = json.loads(arguments_text)
    except (TypeError, ValueError) as err:
        return [f"arguments are not JSON ({err}): {arguments_text!r}"]
    if not isinstance(args, dict):
        return [f"arguments are not an object: {arguments_text!r}"]
    errors = []
    for key in ("city", "days"):
        if key not in args:
            errors.append(f"required `{key}` missing: {arguments_text!r}")
    extra = set(args) - {"city", "days"}
    if extra:
        errors.append(f"unknown properties {sorted(extra)}: {arguments_text!r}")
    if "city" in args and args["city"] not in CITIES:
        errors.append(f"city {args['city']!r} is not in the enum")
    if "days" in args and not is_int(args["days"]):
        errors.append(f"days {args['days']!r} is not an integer")
    return errors


def report_errors(text):
    """Why `text` is not valid for REPORT_SCHEMA ([] when it is)."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as err:
        return [f"content is not JSON ({err}): {text!r}"]
    if not isinstance(value, dict):
        return [f"content is not an object: {text!r}"]
    errors = []
    expected = set(REPORT_SCHEMA["required"])
    if set(value) != expected:
        errors.append(f"properties {sorted(value)} are not {sorted(expected)}: {text!r}")
    if "city" in value and value["city"] not in CITIES:
        errors.append(f"city {value['city']!r} is not in the enum")
    if "temperature_c" in value and not is_int(value["temperature_c"]):
        errors.append(f"temperature_c {value['temperature_c']!r} is not an integer")
    if "rain" in value and not isinstance(value["rain"], bool):
        errors.append(f"rain {value['rain']!r} is not a boolean")
    if "summary" in value and not (
        isinstance(value["summary"], str) and len(value["summary"]) <= 60
    ):
        errors.append(f"summary {value['summary']!r} is not a string of at most 60 characters")
    return errors


def forced_calls(client, runs):
    """(a), first half: RUNS forced calls; returns (report, one valid assistant message)."""
    valid, errors, finishes, valid_message = 0, [], [], None
    for run in range(runs):
        completion = client.chat.completions.create(
            model="main",
            messages=MESSAGES,
            tools=[FORECAST, CONVERT],
            tool_choice={"type": "function", "function": {"name": "get_forecast"}},
            temperature=1.0,
            max_tokens=128,
        )
        choice = completion.choices[0]
        finishes.append(choice.finish_reason)
        calls = choice.message.tool_calls or []
        run_errors = []
        if choice.finish_reason != "tool_calls":
            run_errors.append(f"finish_reason is {choice.finish_reason!r}")
        if not calls:
            run_errors.append(f"no tool_calls; content {choice.message.content!r}")
        for call in calls:
            if call.type != "function" or not call.id:
                run_errors.append(f"call without id or of type {call.type!r}")
            if call.function.name != "get_forecast":
                run_errors.append(f"call of {call.function.name!r}, not get_forecast")
            run_errors.extend(forecast_errors(call.function.arguments))
        if run_errors:
            errors.append({"run": run, "errors": run_errors})
        else:
            valid += 1
            valid_message = valid_message or choice.message
    return {"runs": runs, "valid": valid, "errors": errors, "finishes": finishes}, valid_message


def answer_with_result(client, message):
    """(a), second half: the tool result goes back; the answer must be text."""
    call = message.tool_calls[0]
    args = json.loads(call.function.arguments)
    result = {"city": args["city"], "days": args["days"], "forecast": "sunny", "high_c": 21}
    messages = MESSAGES + [
        {
            "role": "assistant",
            "content": message.content,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    # The tools stay declared (as clients keep them); "none" asks for the answer now.
    completion = client.chat.completions.create(
        model="main",
        messages=messages,
        tools=[FORECAST, CONVERT],
        tool_choice="none",
        temperature=1.0,
        max_tokens=64,
    )
    choice = completion.choices[0]
    return {
        "content": choice.message.content,
        "tool_calls": len(choice.message.tool_calls or []),
        "finish": choice.finish_reason,
    }


def json_schema_answers(client, runs):
    """(b)."""
    valid, errors = 0, []
    for run in range(runs):
        completion = client.chat.completions.create(
            model="main",
            messages=[
                {"role": "user", "content": "Give me a short weather report for Tokyo as JSON."}
            ],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "weather_report", "schema": REPORT_SCHEMA, "strict": True},
            },
            temperature=1.0,
            max_tokens=160,
        )
        choice = completion.choices[0]
        run_errors = report_errors(choice.message.content)
        if choice.message.tool_calls:
            run_errors.append("tool_calls in a json_schema answer")
        if run_errors:
            errors.append({"run": run, "finish": choice.finish_reason, "errors": run_errors})
        else:
            valid += 1
    return {"runs": runs, "valid": valid, "errors": errors}


def helper_stream(client, kwargs, errors):
    """The client's own accumulation (`chat.completions.stream`) of a streamed call."""
    with client.chat.completions.stream(**kwargs) as stream:
        done_events = []
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done_events.append({"name": event.name, "arguments": event.arguments})
        final = stream.get_final_completion()
    choice = final.choices[0]
    calls = choice.message.tool_calls or []
    if choice.finish_reason != "tool_calls" or len(calls) < 1:
        errors.append(f"helper: finish {choice.finish_reason!r} with {len(calls)} calls")
    for call in calls:
        errors.extend(f"helper: {e}" for e in forecast_errors(call.function.arguments))
        valid = not forecast_errors(call.function.arguments)
        if valid and call.function.parsed_arguments != json.loads(call.function.arguments):
            errors.append("helper: parsed_arguments differ from the arguments")
    if [e["arguments"] for e in done_events] != [c.function.arguments for c in calls]:
        errors.append("helper: arguments.done events differ from the final calls")
    return {
        "finish": choice.finish_reason,
        "calls": [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls
        ],
        "done_events": done_events,
    }


def streamed_call(client):
    """(c): the client's streaming helper and a hand accumulation of raw deltas."""
    strict_forecast = {"type": "function", "function": dict(FORECAST["function"], strict=True)}
    kwargs = dict(
        model="main",
        messages=MESSAGES,
        tools=[strict_forecast, CONVERT],
        tool_choice={"type": "function", "function": {"name": "get_forecast"}},
        temperature=1.0,
        max_tokens=128,
    )
    out = {"errors": [], "helper": None}
    try:
        out["helper"] = helper_stream(client, kwargs, out["errors"])
    except openai.OpenAIError as err:
        # E.g. LengthFinishReasonError: the call never completed within max_tokens.
        out["errors"].append(f"helper: {type(err).__name__}: {err}")

    # By hand, from raw chunks: the first delta of a call brings id, type and name.
    raw, finish, deltas = {}, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                deltas += 1
                if delta.index not in raw:
                    if not (delta.id and delta.type == "function" and delta.function.name):
                        out["errors"].append(f"raw: first delta of call {delta.index} lacks id/type/name")
                    raw[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                elif delta.id or delta.function.name:
                    out["errors"].append(f"raw: a later delta of call {delta.index} repeats id/name")
                raw[delta.index]["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finish = choice.finish_reason
    out["raw"] = {"finish": finish, "deltas": deltas, "calls": [raw[i] for i in sorted(raw)]}
    if finish != "tool_calls" or not raw:
        out["errors"].append(f"raw: finish {finish!r} with {len(raw)} calls")
    if sorted(raw) != list(range(len(raw))):
        out["errors"].append(f"raw: call indices {sorted(raw)} are not 0..n")
    for call in raw.values():
        out["errors"].extend(f"raw: {e}" for e in forecast_errors(call["arguments"]))
    return out


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    client = OpenAI(base_url=base_url, api_key=api_key, timeout=120, max_retries=0)
    result = {"openai_version": openai.__version__}

    result["forced"], message = forced_calls(client, runs)
    result["after_result"] = answer_with_result(client, message) if message else None
    result["json_schema"] = json_schema_answers(client, runs)
    result["stream"] = streamed_call(client)

    try:
        client.chat.completions.create(
            model="main",
            messages=MESSAGES,
            tools=[FORECAST],
            tool_choice={"type": "function", "function": {"name": "not_declared"}},
        )
        result["undeclared_choice_status"] = 200
    except openai.APIStatusError as err:
        result["undeclared_choice_status"] = err.status_code

    print(json.dumps(result))


if __name__ == "__main__":
    main()
