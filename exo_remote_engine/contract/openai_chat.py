"""OpenAI chat shapes to and from exo.remote.v1 messages.

Both directions live here so one round-trip test covers the contract: the exo side turns
an OpenAI ``/v1/chat/completions`` body into a ``GenerateRequest``; the sidecar turns that
request back into the keyword arguments LiteLLM's ``acompletion`` takes. Bad input is
reported as a :class:`RemoteError` naming the offending field, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from exo_remote_engine.contract.errors import FieldViolation, Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb

_ROLES: dict[str, pb.Role] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
    "developer": pb.ROLE_DEVELOPER,
}
_ROLE_NAMES = {v: k for k, v in _ROLES.items()}
_TOOL_CHOICE_MODES: dict[str, pb.ToolChoiceMode] = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}
_TOOL_CHOICE_NAMES = {v: k for k, v in _TOOL_CHOICE_MODES.items()}
FINISH_REASONS: dict[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
}
FINISH_REASON_NAMES: dict[int, str] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


def _invalid(field: str, problem: str) -> RemoteError:
    return RemoteError(
        Reason.INVALID_REQUEST, f"invalid request: {field}: {problem}", violations=(FieldViolation(field, problem),)
    )


# --------------------------------------------------------------------------- exo side


def chat_body_to_request(body: Mapping[str, Any], *, request_id: str, model: str) -> pb.GenerateRequest:
    """Build a GenerateRequest from an OpenAI chat-completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list")
    request = pb.GenerateRequest(request_id=request_id, model=model)
    for i, message in enumerate(messages):
        request.messages.append(_message_to_proto(message, f"messages[{i}]"))
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _invalid("tools", "must be a list")
        for i, tool in enumerate(tools):
            request.tools.append(_tool_to_proto(tool, f"tools[{i}]"))
    if body.get("tool_choice") is not None:
        request.tool_choice.CopyFrom(_tool_choice_to_proto(body["tool_choice"]))
    request.sampling.CopyFrom(_sampling_to_proto(body))
    return request


def _message_to_proto(message: Any, where: str) -> pb.Message:
    if not isinstance(message, Mapping):
        raise _invalid(where, "must be an object")
    role = _ROLES.get(str(message.get("role")))
    if role is None:
        raise _invalid(f"{where}.role", f"unknown role {message.get('role')!r}")
    out = pb.Message(role=role)
    content = message.get("content")
    if isinstance(content, str):
        out.content.append(pb.ContentPart(text=content))
    elif isinstance(content, list):
        for j, part in enumerate(content):
            out.content.append(_part_to_proto(part, f"{where}.content[{j}]"))
    elif content is not None:
        raise _invalid(f"{where}.content", "must be a string, a list of parts or null")
    for j, call in enumerate(message.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not fn.get("name"):
            raise _invalid(f"{where}.tool_calls[{j}]", "needs function.name")
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.tool_calls.append(pb.ToolCall(id=str(call.get("id", "")), name=str(fn["name"]), arguments_json=arguments))
    if message.get("tool_call_id"):
        out.tool_call_id = str(message["tool_call_id"])
    if message.get("name"):
        out.name = str(message["name"])
    return out


def _part_to_proto(part: Any, where: str) -> pb.ContentPart:
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    if not isinstance(part, Mapping):
        raise _invalid(where, "must be an object")
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=str(part.get("text", "")))
    if kind in ("image_url", "image"):
        # OpenAI's {"image_url": {"url", "detail"}}, a bare string, or exo's {"image": url}.
        image = part.get("image_url", part.get("image"))
        url, detail = (image.get("url"), image.get("detail", "")) if isinstance(image, Mapping) else (image, "")
        if not isinstance(url, str) or not url:
            raise _invalid(where, "image part needs a url")
        return image_to_part(url, str(detail or ""), where)
    raise _invalid(f"{where}.type", f"unsupported content part type {kind!r}")


def image_to_part(url: str, detail: str, where: str = "image") -> pb.ContentPart:
    """An image URL as a part: data URLs travel as bytes (a third smaller than base64)."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise _invalid(where, "data URLs must be base64 encoded")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _invalid(where, "data URL is not valid base64") from exc
        mime = header[len("data:") :].split(";")[0] or "application/octet-stream"
        return pb.ContentPart(image_data=pb.ImageData(data=data, mime_type=mime, detail=detail))
    if not url.startswith(("http://", "https://")):
        raise _invalid(where, "image url must be http(s) or a base64 data URL")
    return pb.ContentPart(image_url=pb.ImageUrl(url=url, detail=detail))


def _tool_to_proto(tool: Any, where: str) -> pb.ToolDefinition:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _invalid(where, "must be {type: function, function: {name, parameters}}")
    out = pb.ToolDefinition(
        name=fn["name"],
        description=str(fn.get("description") or ""),
        parameters_json_schema=json.dumps(fn.get("parameters") or {"type": "object"}),
    )
    if fn.get("strict") is not None:
        out.strict = bool(fn["strict"])
    return out


def _tool_choice_to_proto(choice: Any) -> pb.ToolChoice:
    if isinstance(choice, str):
        mode = _TOOL_CHOICE_MODES.get(choice)
        if mode is None:
            raise _invalid("tool_choice", f"unknown mode {choice!r}")
        return pb.ToolChoice(mode=mode)
    if isinstance(choice, Mapping):
        fn = choice.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return pb.ToolChoice(function_name=fn["name"])
    raise _invalid("tool_choice", "must be auto, none, required or {function: {name}}")


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(key, "must be a finite number")
    return float(value)


def _sampling_to_proto(body: Mapping[str, Any]) -> pb.SamplingParams:
    out = pb.SamplingParams()
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = _number(body, key)
        if value is not None:
            setattr(out, key, value)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise _invalid("max_tokens", "must be a positive integer")
        out.max_tokens = min(max_tokens, 2**31 - 1)
    stop = body.get("stop")
    if isinstance(stop, str):
        out.stop.append(stop)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        out.stop.extend(stop)
    elif stop is not None:
        raise _invalid("stop", "must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _invalid("seed", "must be an integer")
        out.seed = seed
    if body.get("parallel_tool_calls") is not None:
        out.parallel_tool_calls = bool(body["parallel_tool_calls"])
    return out


# ----------------------------------------------------------------------- sidecar side


MAX_REQUEST_ID_CHARS = 128


def check_request_id(request_id: str) -> None:
    """A request id is a label for logs and the ledger: at most 128 printable characters.
    Checked before anything logs or stores it (a 15 MiB one used to cost seconds of
    redaction and 16 MiB per ledger row)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid("request_id", f"is {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise _invalid("request_id", "holds control or non-printable characters")


def validate_request(request: pb.GenerateRequest) -> None:
    """What the sidecar checks before any provider sees the request (clients other than
    our engine may send anything the schema allows)."""
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise _invalid(f"tools[{i}].name", "is required")
        where = f"tools[{i}].parameters_json_schema"
        try:
            schema = json.loads(tool.parameters_json_schema or "{}")
        except RecursionError:
            raise _invalid(where, f"is nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
        except ValueError:
            raise _invalid(where, "is not valid JSON") from None
        if not isinstance(schema, dict):
            raise _invalid(where, "must be a JSON object")
        _check_json_tree(schema, where)
    s = request.sampling
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if s.HasField(key) and not math.isfinite(getattr(s, key)):
            raise _invalid(f"sampling.{key}", "must be a finite number")
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise _invalid("sampling.max_tokens", "must be a positive integer")
    for i, message in enumerate(request.messages):
        if message.role not in _ROLE_NAMES:
            raise _invalid(f"messages[{i}].role", "is not a known role")
        if message.tool_calls and message.role != pb.ROLE_ASSISTANT:
            raise _invalid(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
        for j, part in enumerate(message.content):
            _check_image(part, f"messages[{i}].content[{j}]")


# JSON Schemas of real tools nest a handful of levels; the limit only has to be far below
# Python's recursion limit, which every later consumer (LiteLLM, json.dumps) runs into.
MAX_SCHEMA_DEPTH = 64
_IMAGE_SCHEMES = ("http://", "https://", "data:")
_MIME_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}")


def _check_json_tree(value: Any, where: str) -> None:
    """Depth at most MAX_SCHEMA_DEPTH and finite numbers only; iterative, so a hostile
    document can never raise RecursionError here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            raise _invalid(where, "must be a JSON object of finite numbers")
        if isinstance(node, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                raise _invalid(where, f"is nested deeper than {MAX_SCHEMA_DEPTH} levels")
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _check_image(part: pb.ContentPart, where: str) -> None:
    """Images the provider fetches must be http(s) (or inline data): a provider, or
    LiteLLM on its behalf, must never be sent to read ``file://`` or another scheme."""
    which = part.WhichOneof("part")
    if which == "image_url" and not part.image_url.url.lower().startswith(_IMAGE_SCHEMES):
        raise _invalid(f"{where}.image_url.url", "must be an http(s) URL or a data URL")
    if which == "image_data" and part.image_data.mime_type and not _MIME_TYPE.fullmatch(part.image_data.mime_type):
        raise _invalid(f"{where}.image_data.mime_type", "must be a media type such as image/png")


def chat_completion_body(request: pb.GenerateRequest) -> dict[str, Any]:
    """The OpenAI chat-completions request body for a GenerateRequest, minus ``model`` and
    the stream options: the direct transport posts it as JSON, and LiteLLM's ``acompletion``
    takes the same names as keyword arguments, so both transports send one body."""
    kwargs: dict[str, Any] = {"messages": [_message_to_openai(m) for m in request.messages]}
    if request.tools:
        kwargs["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": json.loads(t.parameters_json_schema or "{}"),
                    **({"strict": t.strict} if t.HasField("strict") else {}),
                },
            }
            for t in request.tools
        ]
    which = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if which == "mode" and request.tool_choice.mode in _TOOL_CHOICE_NAMES:
        kwargs["tool_choice"] = _TOOL_CHOICE_NAMES[request.tool_choice.mode]
    elif which == "function_name":
        kwargs["tool_choice"] = {
            "type": "function",
            "function": {"name": request.tool_choice.function_name},
        }
    s = request.sampling
    for key in (
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "parallel_tool_calls",
    ):
        if s.HasField(key):
            kwargs[key] = getattr(s, key)
    if s.stop:
        kwargs["stop"] = list(s.stop)
    return kwargs


def _message_to_openai(message: pb.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _ROLE_NAMES.get(message.role, "user")}
    parts = [_part_to_openai(p) for p in message.content]
    if len(parts) == 1 and parts[0]["type"] == "text":
        out["content"] = parts[0]["text"]
    elif parts:
        out["content"] = parts
    else:  # only an assistant turn that calls tools may have no content (providers insist)
        out["content"] = None if message.tool_calls and message.role == pb.ROLE_ASSISTANT else ""
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    if message.name:
        out["name"] = message.name
    return out


def _part_to_openai(part: pb.ContentPart) -> dict[str, Any]:
    which = part.WhichOneof("part")
    if which == "image_url":
        image: dict[str, Any] = {"url": part.image_url.url}
        if part.image_url.detail:
            image["detail"] = part.image_url.detail
        return {"type": "image_url", "image_url": image}
    if which == "image_data":
        encoded = base64.b64encode(part.image_data.data).decode("ascii")
        image = {"url": f"data:{part.image_data.mime_type};base64,{encoded}"}
        if part.image_data.detail:
            image["detail"] = part.image_data.detail
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": part.text}


def usage_to_openai(usage: pb.Usage) -> dict[str, Any]:
    """An OpenAI ``usage`` object, with cached tokens where the provider reported them."""
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.cached_prompt_tokens or usage.cache_creation_prompt_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": usage.cached_prompt_tokens}
    if usage.cache_creation_prompt_tokens:  # (LiteLLM's name for Anthropic's cache writes)
        out["prompt_tokens_details"]["cache_creation_tokens"] = usage.cache_creation_prompt_tokens
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out
