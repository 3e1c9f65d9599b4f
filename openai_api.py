"""The OpenAI-compatible API (/v1/models, /v1/chat/completions) as translations, free of Flask: a chat request
into the service's ask and image, its answer into OpenAI's objects, and every error into OpenAI's error shape.

    chat = read_chat(ChatCompletionRequest.model_validate_json(body))   # image, prompt, system, options
    ... service.ask(chat.prompt, system_prompt=chat.system_prompt, max_new_tokens=chat.max_new_tokens) ...
    completion(model_id, result, usage)  /  stream_events(completion)  /  error_body(error)

What is refused, and why: more or fewer than one image (a caption is of one image), assistant or tool turns
(there is no conversation), `n` other than 1 and a `temperature` other than 0 (decoding is greedy, so every
choice would be the same and a temperature would be ignored). Fields that change nothing here (`top_p`,
`user`, `seed`, ...) are ignored, as OpenAI-compatible servers do. A stream is the finished caption sent as
chunks (the batched model produces whole captions): the role, the text, the finish reason, then `[DONE]`.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from errors import InvalidBodyError, InvalidOptionError, ServiceError
from schemas import ChatCompletionRequest

# OpenAI's error types by status; every 4xx not listed is an invalid request.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


@dataclass(frozen=True)
class Chat:
    """What a chat completion request asks: its one image (a data: URI or URL), the prompt and options."""

    image_url: str
    prompt: str | None
    system_prompt: str | None
    max_new_tokens: int | None
    stream: bool
    include_usage: bool


def read_chat(body: ChatCompletionRequest) -> Chat:
    """The image, prompt, system turn and options of a chat request; InvalidBodyError / InvalidOptionError
    (with the field in `param`) for what this server cannot answer."""
    if body.n is not None and body.n != 1:
        raise InvalidOptionError(f"n must be 1, not {body.n}: decoding is greedy, every choice would be the same",
                                 param="n")
    if body.temperature is not None and body.temperature != 0:
        raise InvalidOptionError(f"temperature must be 0 or absent, not {body.temperature}: this server decodes "
                                 f"greedily (deterministic captions, cached)", param="temperature")
    system: list[str] = []
    user: list[Any] = []
    for message in body.messages:
        if message.role in ("system", "developer"):
            system.append(_text_only(message.content, message.role))
        elif message.role == "user":
            user.append(message.content)
        else:
            raise InvalidBodyError(f"messages: a {message.role!r} message is not accepted; send one user message "
                                   f"holding the image (and optionally a system message)", param="messages")
    if len(user) != 1:
        raise InvalidBodyError(f"messages: exactly one user message is needed (with the image), not {len(user)}",
                               param="messages")
    content = user[0]
    parts = [] if content is None else content if isinstance(content, list) else None
    if parts is None:
        raise InvalidBodyError("messages: the user message must hold an image_url part (content as a list of parts)",
                               param="messages")
    images = [part.image_url.url for part in parts if part.type == "image_url"]
    if len(images) != 1:
        raise InvalidBodyError(f"messages: the user message must hold exactly one image_url part, not {len(images)}",
                               param="messages")
    text = "\n".join(part.text for part in parts if part.type == "text" and part.text).strip()
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Chat(images[0], text or None, "\n".join(s for s in system if s).strip() or None, limit, bool(body.stream),
                include_usage)


def _text_only(content: Any, role: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if any(part.type != "text" for part in content):
        raise InvalidBodyError(f"messages: a {role} message may hold text only", param="messages")
    return "\n".join(part.text or "" for part in content)


def completion(model_id: str, result: dict[str, Any], usage: dict[str, int], finish_reason: str) -> dict[str, Any]:
    """The chat.completion object of one caption (tags and cached as extra fields)."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["caption"], "refusal": None},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]},
        "tags": result["tags"], "cached": result["cached"],
    }


def stream_events(done: dict[str, Any], include_usage: bool) -> Iterator[str]:
    """A finished completion as server-sent events of chat.completion.chunk objects, ending `data: [DONE]`."""
    base = {"id": done["id"], "object": "chat.completion.chunk", "created": done["created"], "model": done["model"]}
    choice = done["choices"][0]

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                  "logprobs": None}])
    yield event([{"index": 0, "delta": {"content": choice["message"]["content"]}, "finish_reason": None,
                  "logprobs": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"], "logprobs": None}],
                tags=done["tags"], cached=done["cached"])
    if include_usage:
        yield event([], usage=done["usage"])
    yield "data: [DONE]\n\n"


def error_status(error: ServiceError) -> int:
    """The status of an error on /v1: as elsewhere, except that a refused image is a 400, as OpenAI answers it."""
    if "file" in error.scope and 400 <= error.status_code < 500 or error.status_code == 502:
        return 400
    return error.status_code


def error_body(error: ServiceError) -> tuple[int, dict[str, Any]]:
    """(status, `{"error": {"message", "type", "code", "param"}}`) of an error on /v1."""
    status = error_status(error)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return status, {"error": {"message": error.message, "type": kind, "code": error.code, "param": error.param}}
