"""Image captioning and tagging service: the Flask app factory, its routes, and the command line.

    python app.py [--blip|--blip2|--gemma|--intern-vlm] [--caption-prompt TEXT] [--port N] ...

Flask lives here and nowhere else; the data path is in service.py.
"""
from __future__ import annotations

import hmac
import json
import logging
import signal
import sys
import threading
import time
import uuid
from typing import Any, Sequence

from flask import Blueprint, Flask, Response, current_app, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

import logs
from config import Config, load_config
from errors import (BadRequestError, ConfigError, ModelLoadError, NoImagesError, ServiceError, TooManyFilesError,
                    UnauthorizedError)
from metrics import Metrics
from openapi import openapi_document
from service import CaptionService, Upload

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
bp = Blueprint("api", __name__)


def create_app(config: Config | None = None, *, service: CaptionService | None = None, **collaborators: Any) -> Flask:
    """Build the Flask app around a CaptionService (created from `config` and any given collaborators).

    The service is not started here: call `service.start()` (main() does it in the background, so the
    server answers /healthz and /readyz while the model loads).
    """
    config = config or (service.config if service else Config())
    service = service or CaptionService(config, **collaborators)
    app = Flask(__name__)
    app.config.update(
        # werkzeug refuses larger bodies before reading them. +1: behind a server that sets
        # wsgi.input_terminated (waitress does), werkzeug's stream raises 413 as soon as the parser reads at the
        # limit, so a body of exactly MAX_REQUEST_BYTES would be refused; waitress already refuses larger ones.
        MAX_CONTENT_LENGTH=config.max_request_bytes + 1,
        MAX_FORM_PARTS=config.max_files_per_request + 16,  # a few text fields besides the files
        JSON_SORT_KEYS=False,
    )
    app.json.sort_keys = False
    app.extensions["caption_service"] = service
    app.register_blueprint(bp)
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


# ----- routes -------------------------------------------------------------------------------------------------
DEMO_PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
                    "form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def index() -> Response:
    """The demo page."""
    service = get_service()
    page = render_template("index.html", info=service.readiness(), model=service.model_info(),
                           default_prompt=service.config.caption_prompt or "",
                           admin_token_required=bool(service.config.admin_token),
                           limits={"max_files_per_request": service.config.max_files_per_request,
                                   "max_request_bytes": service.config.max_request_bytes})
    # A header, unlike the page's meta tag, can also forbid framing (clickjacking).
    return Response(page, headers={"Content-Security-Policy": DEMO_PAGE_POLICY, "X-Content-Type-Options": "nosniff"})


@bp.post("/caption-images")
def caption_images() -> tuple[Response, int]:
    """Caption and tag every file uploaded under `images`; per-file errors leave the others intact."""
    service = get_service()
    files = request.files.getlist("images")
    if not files:
        other = sorted(set(request.files))
        hint = f" (found files under {', '.join(map(repr, other))})" if other else ""
        raise NoImagesError(f"send one or more files as multipart/form-data under the field 'images'{hint}")
    if len(files) > service.config.max_files_per_request:
        raise TooManyFilesError(f"{len(files)} files sent; at most {service.config.max_files_per_request} per "
                                f"request (MAX_FILES_PER_REQUEST)")
    prompt = (request.form.get("prompt") or "").strip() or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequestError(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}",
                              code="prompt_too_long")
    uploads = [Upload(f.filename or "", f.read()) for f in files]
    results, status = service.caption_uploads(uploads, prompt)
    return jsonify(results=results, model=service.model_info()), status


@bp.route("/reset-redis", methods=["GET", "POST"])
def reset_redis() -> Response:
    """Delete this service's cache entries (and nothing else in Redis)."""
    service = get_service()
    _require_admin(service.config)
    try:
        deleted = service.reset_cache()
    except Exception as exc:  # noqa: BLE001 - an unreachable Redis is the operator's problem, said plainly
        raise ServiceError(f"the cache could not be cleared: {type(exc).__name__}: {exc}", code="cache_unavailable",
                           status_code=503) from exc
    return jsonify(message="Redis cache cleared", deleted=deleted)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the process answers."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """Readiness: 200 once the model is loaded and warmed up, else 503; includes the cache's state."""
    service = get_service()
    return jsonify(service.readiness()), 200 if service.ready else 503


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus metrics in the text exposition format."""
    service = get_service()
    # content_type, not mimetype: werkzeug would append a second "; charset=utf-8" to a text/* mimetype.
    return Response(service.metrics.render(), content_type=service.metrics.content_type)


@bp.get("/openapi.json")
def openapi_json() -> Response:
    """The OpenAPI 3 description of this API (limits and security as this server applies them)."""
    return jsonify(openapi_document(get_service().config, max_prompt_chars=MAX_PROMPT_CHARS))


def _require_admin(config: Config) -> None:
    if not config.admin_token:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.admin_token.encode()):
        raise UnauthorizedError("this endpoint needs the header 'Authorization: Bearer <ADMIN_TOKEN>'")


# ----- request bookkeeping and errors ------------------------------------------------------------------------
def _start_request() -> None:
    g.started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    # Keep a client's id when it is sane (so logs join up across services), else make one.
    g.request_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    logs.request_id.set(g.request_id)


def _finish_request(response: Response) -> Response:
    seconds = time.perf_counter() - g.get("started", time.perf_counter())
    endpoint = request.url_rule.rule if request.url_rule else "unmatched"
    service = get_service()
    service.metrics.http_requests.labels(endpoint, request.method, str(response.status_code)).inc()
    service.metrics.http_seconds.labels(endpoint).observe(seconds)
    response.headers["X-Request-ID"] = g.get("request_id", "")
    if endpoint not in ("/healthz", "/readyz", "/metrics"):
        log.info("%s %s -> %d in %.1f ms", request.method, request.path, response.status_code, seconds * 1000,
                 extra={"method": request.method, "path": request.path, "status": response.status_code,
                        "duration_ms": round(seconds * 1000, 2)})
    return response


def _error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(error={"code": code, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _service_error(error: ServiceError) -> Response:
    return _error_response(error.status_code, error.code, error.message, error.headers)


HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
              415: "unsupported_media_type", 431: "headers_too_large", 501: "not_implemented"}


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    message = error.description or error.name
    if status == 413:
        message = _too_large_message(get_service().config.max_request_bytes)
    headers = dict(error.get_headers()) if status == 405 else {}
    headers.pop("Content-Type", None)
    return _error_response(status, HTTP_CODES.get(status, "http_error"), message, headers)


def _too_large_message(limit: int) -> str:
    return (f"the request is larger than {limit} bytes (MAX_REQUEST_BYTES) or has too many parts; "
            f"send fewer or smaller files per request")


def _unexpected_error(error: Exception) -> Response:
    log.exception("Unexpected error while answering %s %s", request.method, request.path)
    return _error_response(500, "internal_error", "the server failed to answer this request; it has been logged")


# ----- serving ------------------------------------------------------------------------------------------------
def make_server(app: Flask, config: Config) -> Any:
    """A waitress server (multi-threaded, production-grade) whose own protocol errors are JSON too."""
    from waitress import create_server
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        """waitress answers oversize or malformed requests itself, before Flask; answer them as JSON too."""

        def execute(self) -> None:
            error = self.request.error
            # error.body can quote the client's own bytes (a malformed header line): json.dumps escapes them.
            message = (_too_large_message(config.max_request_bytes) if error.code == 413
                       else f"{error.reason.lower()}: {error.body}")
            body = json.dumps({"error": {"code": HTTP_CODES.get(error.code, "bad_request"),
                                         "message": message}}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            # These never reach Flask (_finish_request); every response carries a request id, these too.
            self.response_headers.append(("X-Request-ID", uuid.uuid4().hex))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    server = create_server(
        app, host=config.host, port=config.port, threads=config.threads, ident="imgcap",
        # +1: waitress refuses bodies >= its limit, Flask those > MAX_CONTENT_LENGTH; both mean MAX_REQUEST_BYTES.
        max_request_body_size=config.max_request_bytes + 1,
        # Enough connection slots for keep-alive clients plus queued uploads; each costs only a socket.
        connection_limit=max(100, config.threads * 16),
        # Uploads are ~100 KB: read them in a few large chunks, not 13 trips through waitress' I/O loop.
        recv_bytes=256 * 1024,
    )
    server.channel_class = JsonErrorChannel
    return server


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the configuration, start serving, load the model; returns the process exit code."""
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure_logging(config.log_level, config.log_format)
    service = CaptionService(config)
    app = create_app(config, service=service)
    try:
        server = make_server(app, config)
    except OSError as exc:
        log.error("Cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    url = f"http://{config.host}:{server.effective_port}/"
    threading.Thread(target=server.run, name="http", daemon=True).start()
    log.info("Listening on %s; loading the %s model (/readyz answers 503 until it is ready)", url, config.family)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        service.start()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 1
    described = service.captioner.describe()
    log.info("Ready on %s: model %s %s on %s as %s, cache %s", url, described["family"], described["id"],
             described["device"], described["dtype"], service.cache.backend)
    stop.wait()
    log.info("Shutting down")
    # Let the HTTP threads finish what they are doing first: closing the server under them makes each one
    # that is still writing a response log "OSError: [Errno 9] Bad file descriptor" with a traceback.
    server.task_dispatcher.shutdown()
    server.close()
    service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
