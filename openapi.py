"""The OpenAPI 3.0 description of the HTTP API, as served at /openapi.json.

Derived, not copied: the body schemas come from the pydantic models in schemas.py (the same models the views
answer with), the error codes, statuses and meanings from the classes in errors.py, the family ids from the
registry. Built from the running configuration, so the limits it states (files per request, prompt length)
and the security of /reset-redis (a bearer token only when ADMIN_TOKEN is set) are the ones this server applies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic.json_schema import models_json_schema

import schemas
from errors import (
    CacheUnavailableError,
    HttpError,
    InvalidApiKeyError,
    NotReadyError,
    OverloadedError,
    ServiceError,
    UnauthorizedError,
    description,
    error_classes,
)

if TYPE_CHECKING:
    from config import Config

OPENAPI_VERSION = "3.0.3"
API_VERSION = "1.0.0"
COMPONENTS = "#/components/schemas/{model}"


# code -> (HTTP status it comes with, when), from the error classes. Per-file codes appear in a result's
# `error`, the others in an ErrorBody; a request whose files all failed answers with the files' common status.
def _codes(scope: str) -> dict[str, tuple[int | None, str]]:
    return {code: (None if cls is HttpError else cls.status_code, description(cls))
            for code, cls in sorted(error_classes().items()) if scope in cls.scope}


FILE_ERROR_CODES = _codes("file")
REQUEST_ERROR_CODES = _codes("request")
ERROR_CODES: dict[str, tuple[int | None, str]] = {**FILE_ERROR_CODES, **REQUEST_ERROR_CODES}


def _with_status(status: int, scope: str = "request") -> str:
    """The codes of one status and scope, as `a`, `b` for a description."""
    return ", ".join(f"`{code}`" for code, (code_status, _) in _codes(scope).items() if code_status == status)


def _code(*classes: type[ServiceError]) -> str:
    return " or ".join(f"`{cls.code}`" for cls in classes)


def openapi_document(config: "Config", *, max_prompt_chars: int = 2000) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of this service under `config` (a JSON-able dict)."""
    admin, keyed = bool(config.admin_token), bool(config.api_key)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Image captioning and tagging service",
            "version": API_VERSION,
            "description": _api_description(),
        },
        "tags": [{"name": "captions"}, {"name": "openai", "description": "The OpenAI-compatible API"},
                 {"name": "cache"}, {"name": "operations"}],
        "paths": {
            "/caption-images": {"post": _keyed(_caption_images(config, max_prompt_chars), keyed)},
            "/v1/models": {"get": _keyed(_list_models(), keyed)},
            "/v1/models/{model_id}": {"get": _keyed(_get_model(), keyed)},
            "/v1/chat/completions": {"post": _keyed(_chat_completions(config, max_prompt_chars), keyed)},
            "/reset-redis": {"get": _reset_redis("get", admin), "post": _reset_redis("post", admin)},
            "/healthz": {"get": _healthz()},
            "/readyz": {"get": _readyz()},
            "/metrics": {"get": _metrics()},
            "/openapi.json": {"get": _openapi_json()},
            "/": {"get": _index()},
        },
        "components": _components(admin, keyed),
    }


# ----- operations ---------------------------------------------------------------------------------------------
def _caption_images(config: "Config", max_prompt_chars: int) -> dict[str, Any]:
    either = {"oneOf": [_ref("CaptionResponse"), _ref("ErrorBody")]}
    return {
        "tags": ["captions"],
        "operationId": "captionImages",
        "summary": "Caption and tag uploaded images",
        "description": (
            "One result per uploaded file, in upload order: a caption with its tags, or that file's error. "
            "The other files of a request are captioned even when some fail. Results are cached (keyed on the "
            "image's SHA-256 and the model configuration); `cached` says whether this one came from the cache.\n\n"
            "When no file could be captioned, the status is the files' common error status (400, 413, 415, or "
            "500 when the model failed), else 400, with the same body as a 200."),
        "parameters": [_ref("RequestId", "parameters")],
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array", "minItems": 1, "maxItems": config.max_files_per_request,
                            "items": {"type": "string", "format": "binary"},
                            "description": (
                                f"One or more image files (JPEG, PNG, WebP, GIF, BMP, TIFF; HEIC/AVIF when the "
                                f"plugin is installed). At most {config.max_files_per_request} files "
                                f"(MAX_FILES_PER_REQUEST), {config.max_file_bytes} bytes each (MAX_FILE_BYTES), "
                                f"{config.max_image_pixels} pixels each (MAX_IMAGE_PIXELS) and "
                                f"{config.max_request_bytes} bytes in all (MAX_REQUEST_BYTES). The format is "
                                f"read from the bytes; the filename is echoed back as data only."),
                        },
                        "prompt": {
                            "type": "string", "maxLength": max_prompt_chars,
                            "description": ("Overrides the server's default prompt for this request; empty (or "
                                            "only spaces) means the default."),
                        },
                        "max_new_tokens": {"type": "string", "pattern": "^[0-9]{1,6}$", "description": (
                            f"Longest caption in new tokens, 1 to {config.max_new_tokens} (MAX_NEW_TOKENS, the "
                            f"default).")},
                        "num_beams": {"type": "string", "pattern": "^[0-9]{1,3}$", "description": (
                            f"Beam search width, 1 (greedy, the default) to {config.max_num_beams} "
                            f"(MAX_NUM_BEAMS).")},
                    },
                },
            },
                "application/json": {"schema": _ref("CaptionRequest")}},
        },
        "responses": {
            "200": _json("At least one file was captioned.", _ref("CaptionResponse")),
            "400": _json(f"No file could be captioned (bad input), or the request is refused: "
                         f"{_with_status(400)}.", either),
            "403": _json(f"{_with_status(403)}.", _ref("ErrorBody")),
            "408": _json(f"{_with_status(408)}.", _ref("ErrorBody")),
            "413": _json(f"No file could be captioned (too large), or the request is too large: "
                         f"{_with_status(413)}.", either),
            "415": _json("No file could be captioned: none is an image in an accepted format.",
                         _ref("CaptionResponse")),
            "500": _json("Every file's caption failed in the model (per file), or an unexpected fault.", either),
            "502": _json("No file could be captioned: every image URL failed to fetch.", _ref("CaptionResponse")),
            "503": _json(f"{_code(NotReadyError)} (the model is loading) or {_code(OverloadedError)} (too much "
                         f"queued work).", _ref("ErrorBody"), retry_after=True),
        },
    }


def _keyed(operation: dict[str, Any], keyed: bool) -> dict[str, Any]:
    """An operation that needs `Authorization: Bearer <API_KEY>` when API_KEY is set."""
    if keyed:
        operation["security"] = [{"apiKey": []}]
        operation["responses"]["401"] = _json(f"{_code(InvalidApiKeyError)}: the API key is missing or wrong.",
                                              _error_ref(operation))
    return operation


def _error_ref(operation: dict[str, Any]) -> dict[str, str]:
    return _ref("OpenAIErrorBody") if "openai" in operation["tags"] else _ref("ErrorBody")


def _list_models() -> dict[str, Any]:
    return {
        "tags": ["openai"], "operationId": "listModels", "summary": "The loaded checkpoint (OpenAI's model list)",
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {"200": _json("The one model this server serves.", _ref("ModelList"))},
    }


def _get_model() -> dict[str, Any]:
    return {
        "tags": ["openai"], "operationId": "getModel", "summary": "The loaded checkpoint by its id",
        "parameters": [_ref("RequestId", "parameters"),
                       {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": _json("The model.", _ref("ModelCard")),
                      "404": _json("Not the loaded checkpoint.", _ref("OpenAIErrorBody"))},
    }


def _chat_completions(config: "Config", max_prompt_chars: int) -> dict[str, Any]:
    return {
        "tags": ["openai"], "operationId": "createChatCompletion",
        "summary": "Caption one image, as an OpenAI chat completion",
        "description": (
            "One user message holding one `image_url` part (a `data:` URI or an http(s) URL) and optionally text "
            f"parts (the prompt, at most {max_prompt_chars} characters); an optional system message, the system "
            "turn of the chat families (refused for BLIP and BLIP-2). `max_tokens` / `max_completion_tokens` "
            f"1 to {config.max_new_tokens}; `n` 1; `temperature` 0 or absent. The caption is "
            "`choices[0].message.content`; `tags` and `cached` are extra fields. With `stream: true` the answer "
            "is `text/event-stream`: chat.completion.chunk objects, then `data: [DONE]`. Errors use OpenAI's "
            "shape (`OpenAIErrorBody`; `code` is this server's error code); a refused image is a 400."),
        "parameters": [_ref("RequestId", "parameters")],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ChatCompletionRequest")}}},
        "responses": {
            "200": {"description": "The caption (or its event stream).", "headers": _headers(), "content": {
                "application/json": {"schema": _ref("ChatCompletion")},
                "text/event-stream": {"schema": {
                    "type": "object", "required": ["data"],
                    "description": ("One server-sent event: `data` is a chat.completion.chunk as JSON, the last "
                                    "one `[DONE]`."),
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}},
            "400": _json("The request or its image is refused (see `error.code`).", _ref("OpenAIErrorBody")),
            "413": _json(f"{_with_status(413)}.", _ref("OpenAIErrorBody")),
            "415": _json("The body is not JSON.", _ref("OpenAIErrorBody")),
            "500": _json("The model failed on the image, or an unexpected fault.", _ref("OpenAIErrorBody")),
            "503": _json(f"{_code(NotReadyError)} or {_code(OverloadedError)}.", _ref("OpenAIErrorBody"),
                         retry_after=True),
        },
    }


def _reset_redis(method: str, admin: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": ["cache"],
        "operationId": f"resetRedis{method.title()}",
        "summary": "Delete this service's cache entries",
        "description": ("Deletes the keys under CACHE_PREFIX only (never FLUSHDB or FLUSHALL). GET and POST do "
                        "the same." + (" Needs `Authorization: Bearer <ADMIN_TOKEN>`." if admin else
                                       " ADMIN_TOKEN is not set on this server, so no token is needed.")),
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {
            "200": _json("The cache was cleared.", _ref("ResetResponse")),
            "403": _json(f"{_with_status(403)}: a browser request from another site.", _ref("ErrorBody")),
            "503": _json(f"{_code(CacheUnavailableError)}: Redis could not be reached.", _ref("ErrorBody")),
        },
    }
    if admin:
        operation["security"] = [{"adminToken": []}]
        operation["responses"]["401"] = _json(f"{_code(UnauthorizedError)}: the bearer token is missing or wrong.",
                                              _ref("ErrorBody"))
    else:
        operation["security"] = []
    return operation


def _healthz() -> dict[str, Any]:
    return {
        "tags": ["operations"], "operationId": "healthz", "summary": "Liveness: the process answers",
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {"200": _json("The process is alive.", _ref("Health"))},
    }


def _readyz() -> dict[str, Any]:
    return {
        "tags": ["operations"], "operationId": "readyz",
        "summary": "Readiness: the model is loaded and warmed up",
        "description": ("200 once the model is loaded and a warm-up caption has run, else 503. Either way the "
                        "body says which model, where it runs, and the cache's state; `cache.redis_reachable` "
                        "is a live PING of Redis (null when the backend is not Redis)."),
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {
            "200": _json("Ready to caption.", _ref("Ready")),
            "503": _json("Starting (model loading or warming up) or failed.", _ref("NotReady")),
        },
    }


def _metrics() -> dict[str, Any]:
    return {
        "tags": ["operations"], "operationId": "metrics", "summary": "Prometheus metrics",
        "description": ("The Prometheus text exposition format: caption_http_requests_total, "
                        "caption_http_request_duration_seconds, caption_images_total, caption_cache_requests_total, "
                        "caption_batch_size, caption_generate_duration_seconds, caption_queue_images, "
                        "caption_model_load_seconds, caption_redis_up."),
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {"200": {
            "description": "The metrics.",
            "headers": _headers(),
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }},
    }


def _openapi_json() -> dict[str, Any]:
    return {
        "tags": ["operations"], "operationId": "openapi", "summary": "This document",
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {"200": _json("The OpenAPI document.", {"type": "object", "required": ["openapi", "paths"]})},
    }


def _index() -> dict[str, Any]:
    return {
        "tags": ["operations"], "operationId": "demoPage", "summary": "The browser demo page",
        "parameters": [_ref("RequestId", "parameters")],
        "responses": {"200": {
            "description": "An HTML page to try the service.",
            "headers": _headers(),
            "content": {"text/html": {"schema": {"type": "string"}}},
        }},
    }


# ----- components ---------------------------------------------------------------------------------------------
def _components(admin: bool, keyed: bool = False) -> dict[str, Any]:
    components: dict[str, Any] = {
        "schemas": body_schemas(),
        "parameters": {
            "RequestId": {
                "name": "X-Request-ID", "in": "header", "required": False, "schema": {"type": "string"},
                "description": ("Your own request id, kept (and logged) when it is 1-128 printable characters; "
                                "otherwise the server makes one. Returned in the X-Request-ID response header."),
            },
        },
        "headers": {
            "X-Request-ID": {"required": True, "schema": {"type": "string", "minLength": 1},
                             "description": "The request's id, as in the server's log lines."},
            "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 0},
                            "description": "Seconds to wait before retrying."},
        },
    }
    schemes = {}
    if admin:
        schemes["adminToken"] = {"type": "http", "scheme": "bearer", "description": "The server's ADMIN_TOKEN."}
    if keyed:
        schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "The server's API_KEY."}
    if schemes:
        components["securitySchemes"] = schemes
    return components


# ----- helpers ------------------------------------------------------------------------------------------------
def _ref(name: str, section: str = "schemas") -> dict[str, str]:
    return {"$ref": f"#/components/{section}/{name}"}


def _headers(retry_after: bool = False) -> dict[str, Any]:
    headers = {"X-Request-ID": _ref("X-Request-ID", "headers")}
    if retry_after:
        headers["Retry-After"] = _ref("Retry-After", "headers")
    return headers


def _json(description: str, schema: dict[str, Any], *, retry_after: bool = False) -> dict[str, Any]:
    return {"description": description, "headers": _headers(retry_after),
            "content": {"application/json": {"schema": schema}}}


def body_schemas() -> dict[str, Any]:
    """components/schemas: the JSON Schema of each model in schemas.DOCUMENTED, in the OpenAPI 3.0 dialect."""
    _, top = models_json_schema([(model, "serialization") for model in schemas.DOCUMENTED], ref_template=COMPONENTS)
    found = {name: _openapi30(schema) for name, schema in top["$defs"].items()}
    return {model.__name__: found[model.__name__] for model in schemas.DOCUMENTED}


def _openapi30(node: Any) -> Any:
    """pydantic's JSON Schema (2020-12) as OpenAPI 3.0: `X | None` as `nullable`, `const` as a one-item enum,
    no titles."""
    if isinstance(node, list):
        return [_openapi30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _openapi30(value) for key, value in node.items() if key != "title"}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    options = node.get("anyOf", [])
    if len(options) == 2 and {"type": "null"} in options:
        (real,) = [option for option in options if option != {"type": "null"}]
        del node["anyOf"]
        node.update({"allOf": [real]} if "$ref" in real else real)
        node["nullable"] = True
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
    return node


def _api_description() -> str:
    return (
        "Captions uploaded images with one vision-language model and turns each caption into search tags. "
        "Every error body is JSON with a stable `code` and a human `message`: `{\"error\": {\"code\", "
        "\"message\"}}`, or, for one file of a caption request, `{\"filename\", \"error\": {\"code\", "
        "\"message\"}}` in that file's place. Every response carries an X-Request-ID header.\n\n"
        "Error codes of a whole request:\n" + schemas.code_table("request")
        + "\n\nError codes of one file:\n" + schemas.code_table("file"))
