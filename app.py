"""Image captioning and tagging service: the Flask app (create_app, its blueprints, error handlers).

    python app.py [--blip|--blip2|--gemma|--intern-vlm] [--caption-prompt TEXT] [--port N] ...

Flask lives here and nowhere else; this module turns HTTP into calls of the service (service.py) and
its answers into HTTP: status codes, headers, JSON. Serving it (the production server, signals, start-up)
is serving.py, which `python app.py` runs.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import sys
import time
import uuid
from typing import Any, Sequence
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, g, jsonify, render_template, request
from pydantic import BaseModel, ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import PathConverter

import logs
import openai_api
from config import Config
from errors import (
    BadRequestError,
    CacheUnavailableError,
    CrossSiteRequestError,
    HeadersTooLargeError,
    HostNotAllowedError,
    HttpError,
    InternalError,
    InvalidApiKeyError,
    InvalidBodyError,
    InvalidOptionError,
    MethodNotAllowedError,
    NoImagesError,
    NotFoundError,
    NotImplementedHttpError,
    NotReadyError,
    PromptTooLongError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceError,
    TooManyFilesError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from forms import read_form
from openapi import openapi_document
from schemas import (
    Body,
    CaptionRequest,
    CaptionResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Error,
    ErrorBody,
    Health,
    ModelCard,
    ModelList,
    NotReady,
    Ready,
    ResetResponse,
    field_error,
)
from service import Ask, CaptionService
from sources import ImageSources, Source

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
# Werkzeug's own refusals (routing, body limits), by status, as the error classes clients know.
HTTP_ERRORS: dict[int, type[ServiceError]] = {cls.status_code: cls for cls in (
    BadRequestError, NotFoundError, MethodNotAllowedError, RequestTimeoutError, RequestTooLargeError,
    UnsupportedMediaTypeError, HeadersTooLargeError, NotImplementedHttpError)}
# Metric labels take one of these methods, or "other": a client cannot add series by inventing methods.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
DEMO_PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                    "form-action 'self'; frame-ancestors 'none'")

# What /reset-redis says it cleared, by cache backend (SPEC §4 names the Redis one).
RESET_MESSAGES = {"redis": "Redis cache cleared", "memory": "In-process cache cleared (no Redis is in use)",
                  "off": "Nothing to clear (CACHE_BACKEND=off)"}

api = Blueprint("api", __name__)
openai = Blueprint("openai", __name__, url_prefix="/v1")  # the OpenAI-compatible API (openai_api.py)
page = Blueprint("page", __name__)


class ModelIdConverter(PathConverter):
    """A model id as the rest of the path: a Hub id (`Salesforce/blip-...`) or a local folder (`/models/blip`, which
    starts with a slash, unlike what werkzeug's `path` takes)."""

    regex = ".+"
    part_isolating = False  # werkzeug would infer True from a regex without "/"


class JsonResponse(Response):
    """Responses are JSON unless a view says otherwise (the demo page): an automatic answer (OPTIONS, HEAD)
    is never an HTML page."""

    default_mimetype = "application/json"


def create_app(config: Config | None = None, *, service: CaptionService | None = None, **collaborators: Any) -> Flask:
    """Build the Flask app around a CaptionService (created from `config` and any given collaborators).

    The service is not started here: call `service.start()` (serving.main() does it in the background, so
    the server answers /healthz and /readyz while the model loads).
    """
    config = config or (service.config if service else Config())
    service = service or CaptionService(config, **collaborators)
    app = Flask(__name__)
    app.response_class = JsonResponse
    app.config.update(
        # werkzeug refuses larger bodies before reading them. +1: behind a server that sets
        # wsgi.input_terminated (waitress does), werkzeug's stream raises 413 as soon as the parser reads at the
        # limit, so a body of exactly MAX_REQUEST_BYTES would be refused; waitress already refuses larger ones.
        MAX_CONTENT_LENGTH=config.max_request_bytes + 1,
        ALLOWED_HOSTS=config.trusted_hosts,
    )
    app.json.sort_keys = False
    # No redirects: a merged slash would answer a 308 pointing at whatever Host the client sent. (The only
    # rule ending in a slash is "/", so strict slashes never redirect.)
    app.url_map.merge_slashes = False
    app.url_map.converters["model_id"] = ModelIdConverter
    app.extensions["caption_service"] = service
    app.extensions["image_sources"] = ImageSources(config)
    app.extensions["created"] = int(time.time())
    app.register_blueprint(api)
    app.register_blueprint(openai)
    app.register_blueprint(page)
    app.register_error_handler(ServiceError, _service_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(lambda _exc: logs.request_id.set(None))  # waitress reuses threads: no stale ids
    return app


def get_service() -> CaptionService:
    """The CaptionService of the current app."""
    return current_app.extensions["caption_service"]


# ----- the demo page ------------------------------------------------------------------------------------------
@page.get("/")
def index() -> Response:
    """The demo page."""
    service = get_service()
    html = render_template("index.html", info=service.readiness(), model=service.model_info(),
                           default_prompt=service.config.caption_prompt or "",
                           admin_token_required=bool(service.config.admin_token),
                           api_key_required=bool(service.config.api_key),
                           limits={"max_files_per_request": service.config.max_files_per_request,
                                   "max_request_bytes": service.config.max_request_bytes})
    return Response(html, mimetype="text/html")


# ----- the API ------------------------------------------------------------------------------------------------
@api.post("/caption-images")
def caption_images() -> Response:
    """Caption and tag every image of the request (multipart files under `images`, or a JSON body with base64
    data and URLs); per-image errors leave the others intact."""
    service = get_service()
    _require_api_key(service.config)
    if _is_json(request.mimetype):
        body = read_json(CaptionRequest)
        _check_count(len(body.images), service.config.max_files_per_request)
        ask = _ask(service, body.prompt, max_new_tokens=body.max_new_tokens, num_beams=body.num_beams)
        uploads, refused = get_sources().uploads([Source(i.filename, i.data, i.url) for i in body.images])
    else:
        limit = service.config.max_files_per_request
        form = read_form(request.stream, request.headers.get("Content-Type", ""), max_parts=limit + 16)
        if not form.uploads:
            other = [repr(name) if name else "a part with no name" for name in sorted(set(form.other_file_fields))]
            hint = f" (found files under {', '.join(other)})" if other else ""
            raise NoImagesError(f"send one or more files as multipart/form-data under the field 'images', or a "
                                f"JSON body{hint}")
        _check_count(len(form.uploads), limit)
        ask = _ask(service, form.fields.get("prompt"), max_new_tokens=_form_int(form.fields, "max_new_tokens"),
                   num_beams=_form_int(form.fields, "num_beams"))
        uploads, refused = form.uploads, {}
    answer = service.caption_uploads(uploads, ask, refused=refused)
    body = CaptionResponse.model_validate({"results": answer.results, "model": service.model_info()})
    return json_response(body, caption_status(answer.errors))


def get_sources() -> ImageSources:
    """Base64 and URL images of the current app."""
    return current_app.extensions["image_sources"]


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def read_json(model: type[BaseModel]) -> Any:
    """The request's JSON body validated by `model` (InvalidBodyError naming the field otherwise)."""
    if not _is_json(request.mimetype):
        raise UnsupportedMediaTypeError("send the body as JSON (Content-Type: application/json)")
    try:
        return model.model_validate_json(request.get_data(cache=False))
    except ValidationError as exc:
        raise InvalidBodyError(f"the JSON body is not valid: {field_error(exc)}") from None


def _check_count(count: int, limit: int) -> None:
    if count > limit:
        raise TooManyFilesError(f"{count} images sent; at most {limit} per request (MAX_FILES_PER_REQUEST)")


# A form field's whole number: ASCII digits only (int() would also take "１０" and "1_0"); no length limit here,
# as a JSON number has none: the bounds (service.ask) refuse what is out of range
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+", re.ASCII)


def _form_int(fields: dict[str, str], name: str) -> int | None:
    text = (fields.get(name) or "").strip()
    if not text:
        return None
    if not _WHOLE_NUMBER.fullmatch(text):
        raise InvalidOptionError(f"{name} must be a whole number (digits 0-9), not {text[:40]!r}", param=name)
    sign, digits = (-1 if text[0] == "-" else 1), text.lstrip("+-").lstrip("0") or "0"
    # int() refuses more than 4300 digits; anything past 18 is out of every bound, and says so as such
    return sign * int(digits if len(digits) <= 18 else "9" * 19)


def _ask(service: CaptionService, prompt: str | None, *, system_prompt: str | None = None,
         max_new_tokens: int | None = None, num_beams: int | None = None) -> Ask:
    """A request's options, checked (the service checks them against the model once it is loaded)."""
    prompt = (prompt or "").strip() or None
    for name, text in (("prompt", prompt), ("system prompt", system_prompt)):
        if text is not None and len(text) > MAX_PROMPT_CHARS:
            raise PromptTooLongError(f"the {name} is {len(text)} characters; at most {MAX_PROMPT_CHARS}",
                                     param="messages" if name == "system prompt" else "prompt")
    if not service.ready:
        raise NotReadyError("the model is still loading; retry in a few seconds", retry_after=5)
    return service.ask(prompt, system_prompt=system_prompt, max_new_tokens=max_new_tokens, num_beams=num_beams)


# ----- the OpenAI-compatible API ------------------------------------------------------------------------------
@openai.before_request
def _openai_api_key() -> None:
    """Every /v1 route needs the API key when API_KEY is set."""
    _require_api_key(get_service().config)


@openai.get("/models")
def list_models() -> Response:
    """The loaded checkpoint, as OpenAI's model list."""
    return json_response(ModelList.model_validate({"object": "list", "data": [_model_card()]}))


@openai.get("/models/<model_id:model_id>")
def get_model(model_id: str) -> Response:
    """The loaded checkpoint by its id (404 for any other)."""
    card = _model_card()
    if model_id != card["id"]:
        raise NotFoundError(f"this server serves {card['id']!r} only, not {model_id!r}", param="model")
    return json_response(ModelCard.model_validate(card))


def _model_card() -> dict[str, Any]:
    return {"id": get_service().model_info()["id"], "object": "model", "created": current_app.extensions["created"],
            "owned_by": "imgcap"}


@openai.post("/chat/completions")
def chat_completions() -> Response:
    """A caption of the one image of a chat request, as an OpenAI chat completion (or its stream)."""
    service = get_service()
    chat = openai_api.read_chat(read_json(ChatCompletionRequest))
    ask = _ask(service, chat.prompt, system_prompt=chat.system_prompt, max_new_tokens=chat.max_new_tokens)
    source = Source("", data=chat.image_url) if chat.image_url[:5].lower() == "data:" else Source("", url=chat.image_url)
    uploads, refused = get_sources().uploads([source])
    answer = service.caption_uploads(uploads, ask, refused=refused)
    if answer.errors[0] is not None:
        error = answer.errors[0]
        error.param = error.param or "messages"
        raise error
    result, generated = answer.results[0], answer.values[0]
    assert generated is not None  # a file without an error has its stored value
    usage = {"prompt_tokens": service.captioner.input_tokens(ask.prompt, ask.system_prompt),
             "completion_tokens": generated["new_tokens"]}
    done = openai_api.completion(service.model_info()["id"], result, usage,
                                 "stop" if generated["stopped"] else "length")
    if chat.stream:
        return Response(openai_api.stream_events(done, chat.include_usage), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache"})
    return json_response(ChatCompletion.model_validate(done))


def caption_status(errors: Sequence[ServiceError | None]) -> int:
    """200 when any file was captioned; else the files' common error status (413, 415, ...), or 400."""
    if any(error is None for error in errors):
        return 200
    statuses = {error.status_code for error in errors}
    return statuses.pop() if len(statuses) == 1 else 400


@api.route("/reset-redis", methods=["GET", "POST"])
def reset_redis() -> Response:
    """Delete this service's cache entries (and nothing else in Redis)."""
    if request.method == "HEAD":  # Flask answers HEAD for every GET route; a probe must not clear the cache
        raise MethodNotAllowed(valid_methods=["GET", "POST"])
    service = get_service()
    _require_admin(service.config)
    _refuse_cross_site()
    try:
        deleted = service.reset_cache()
    except Exception as exc:  # noqa: BLE001 - an unreachable Redis is the operator's problem, said plainly
        raise CacheUnavailableError(f"the cache could not be cleared: {type(exc).__name__}: {exc}") from exc
    return json_response(ResetResponse(message=RESET_MESSAGES[service.cache.backend], deleted=deleted))


@api.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return json_response(Health(status="ok"))


@api.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 once the model is loaded and warmed up, else 503; includes the cache's state."""
    service = get_service()
    if service.ready:
        return json_response(Ready.model_validate(service.readiness()))
    return json_response(NotReady.model_validate(service.readiness()), 503)


@api.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics in the text exposition format."""
    service = get_service()
    # content_type, not mimetype: werkzeug would append a second "; charset=utf-8" to a text/* mimetype.
    return Response(service.metrics.render(), content_type=service.metrics.content_type)


@api.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3 description of this API (limits and security as this server applies them)."""
    return jsonify(openapi_document(get_service().config, max_prompt_chars=MAX_PROMPT_CHARS))


def _require_api_key(config: Config) -> None:
    """With API_KEY set, the caption endpoints need `Authorization: Bearer <API_KEY>`."""
    if not config.api_key:
        return
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
        raise InvalidApiKeyError("this server needs the header 'Authorization: Bearer <API_KEY>' (missing or wrong "
                                 "key)")


def _require_admin(config: Config) -> None:
    if not config.admin_token:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
        raise UnauthorizedError("this endpoint needs the header 'Authorization: Bearer <ADMIN_TOKEN>'")


def _refuse_cross_site() -> None:
    """A browser's request from another site (an <img src> or a form on any web page) must not change state.

    Browsers say where a request comes from (Fetch metadata; Origin; Referer); curl and other programs send
    none of these and are let through, as is the demo page (same origin).
    """
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    if site and site not in ("same-origin", "none"):
        raise CrossSiteRequestError(f"a {site} browser request may not clear the cache; use the demo page of this "
                                    f"server, or call it from a program")
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value and urlsplit(value).netloc.lower() != request.headers.get("Host", "").lower():
            raise CrossSiteRequestError(f"a request from another origin ({header}) may not clear the cache")


# ----- request bookkeeping and errors ------------------------------------------------------------------------
def _start_request() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    # Keep a client's id when it is sane (so logs join up across services), else make one.
    g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    logs.request_id.set(g.request_id)
    allowed = current_app.config["ALLOWED_HOSTS"]
    host = request.headers.get("Host")
    if allowed is not None and host is not None and not host_allowed(host, allowed):
        raise HostNotAllowedError("this server does not answer to that Host name; set ALLOWED_HOSTS to the names "
                                  "clients use to reach it")


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    """Whether a Host header (`name`, `name:port`, `[v6]:port`) names one of `allowed` (".x" for subdomains)."""
    host = host.strip().lower()
    if host.startswith("["):
        name = host[:host.find("]") + 1]
    else:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            name = host
    name = name.rstrip(".")
    return any(name == entry or (entry.startswith(".") and (name.endswith(entry) or name == entry[1:]))
               for entry in allowed)


def _finish_request(response: Response) -> Response:
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    service = get_service()
    service.metrics.http_requests.labels(endpoint, method, str(response.status_code)).inc()
    service.metrics.http_seconds.labels(endpoint).observe(seconds)
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        # A header, unlike the page's meta tag, can also forbid framing (clickjacking).
        response.headers["Content-Security-Policy"] = DEMO_PAGE_POLICY
        response.headers["X-Frame-Options"] = "DENY"
    if endpoint not in ("/healthz", "/readyz", "/metrics"):
        log.info("%s %s -> %d in %.1f ms", request.method, request.path, response.status_code, seconds * 1000,
                 extra={"method": request.method, "path": request.path, "status": response.status_code,
                        "duration_ms": round(seconds * 1000, 2)})
    return response


def json_response(body: Body, status: int = 200) -> Response:
    """A JSON answer built from its model (schemas.py), fields absent where the model leaves them unset."""
    return current_app.response_class(body.model_dump_json(exclude_unset=True), status=status,
                                      mimetype="application/json")


def _error_response(error: ServiceError, headers: dict[str, str] | None = None) -> Response:
    # Not validated: an error answer must never fail to build (the code comes from an error class anyway).
    if request.path.startswith("/v1/"):  # OpenAI's shape, so that OpenAI SDKs raise the matching exception
        status, shaped = openai_api.error_body(error)
        response = current_app.response_class(json.dumps(shaped), status=status, mimetype="application/json")
    else:
        body = ErrorBody.model_construct(error=Error.model_construct(code=error.code, message=error.message))
        response = json_response(body, error.status_code)
    response.headers.update(headers or {})
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def _service_error(error: ServiceError) -> Response:
    return _error_response(error)


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    message = error.description or error.name
    if status == 413:
        message = too_large_message(get_service().config.max_request_bytes)
    cls = HTTP_ERRORS.get(status, HttpError)
    mapped = cls(message)
    mapped.status_code = status  # HttpError keeps werkzeug's own status
    headers = dict(error.get_headers()) if status == 405 else {}
    headers.pop("Content-Type", None)
    return _error_response(mapped, headers)


def too_large_message(limit: int) -> str:
    """What a client is told when its request is over MAX_REQUEST_BYTES."""
    return (f"the request is larger than {limit} bytes (MAX_REQUEST_BYTES) or has too many parts; "
            f"send fewer or smaller files per request")


def _unexpected_error(error: Exception) -> Response:
    log.exception("Unexpected error while answering %s %s", request.method, request.path)
    return _error_response(InternalError("the server failed to answer this request; it has been logged"))


if __name__ == "__main__":
    from serving import main

    sys.exit(main())
