"""Serving the app: the production HTTP server (waitress), start-up, signals and graceful shutdown.

`python app.py` runs `main()`. The server listens first and loads the model in the background, so that
/healthz and /readyz answer while it loads.

Why waitress, extended here rather than replaced: it never hands a worker thread to a connection that has
not sent a whole request (its I/O thread buffers headers and body), so a slow or idle client costs a socket,
not a worker. What it lacks is a deadline for a request that trickles in, and enough connection slots by
default; `ServingChannel`/`ServingServer` add both (HEADER_TIMEOUT_SECONDS, BODY_TIMEOUT_SECONDS,
IDLE_TIMEOUT_SECONDS, CONNECTION_LIMIT). Behind a public network, put a reverse proxy in front anyway (README,
Deploying).
"""
from __future__ import annotations

import json
import logging
import resource
import signal
import sys
import threading
import time
import uuid
from typing import Any, Sequence

import allocator
import logs
from app import create_app, too_large_message
from config import Config, load_config
from errors import (
    BadRequestError,
    ConfigError,
    HeadersTooLargeError,
    ModelLoadError,
    NotImplementedHttpError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServiceError,
)
from service import CaptionService

log = logging.getLogger(__name__)

WAITRESS_ERRORS: dict[int, type[ServiceError]] = {cls.status_code: cls for cls in (
    BadRequestError, RequestTimeoutError, RequestTooLargeError, HeadersTooLargeError, NotImplementedHttpError)}
CLEANUP_INTERVAL_SECONDS = 1.0  # how often deadlines are enforced


def json_error_bytes(error: ServiceError, request_version: str = "1.1") -> bytes:
    """A complete HTTP response (closing the connection) for an error answered outside Flask."""
    body = json.dumps({"error": error.to_dict()}).encode()
    head = (f"HTTP/{request_version} {error.status_code} {_reason(error.status_code)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
            f"X-Content-Type-Options: nosniff\r\nX-Request-ID: {uuid.uuid4().hex}\r\n\r\n")
    return head.encode("latin-1") + body


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def make_server(app: Any, config: Config) -> Any:
    """A waitress server (multi-threaded, production-grade) whose own errors are JSON and whose clients are
    held to deadlines (see the module docstring)."""
    from waitress import create_server
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask, WSGITask

    class JsonErrorTask(ErrorTask):
        """waitress answers oversize or malformed requests itself, before Flask; answer them as JSON too."""

        def execute(self) -> None:
            error = self.request.error
            # error.body can quote the client's own bytes (a malformed header line): json.dumps escapes them.
            message = (too_large_message(config.max_request_bytes) if error.code == 413
                       else f"{error.reason.lower()}: {error.body}")
            mapped = WAITRESS_ERRORS.get(error.code, BadRequestError)(message)
            body = json.dumps({"error": mapped.to_dict()}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.response_headers.append(("X-Content-Type-Options", "nosniff"))
            # These never reach Flask (_finish_request); every response carries a request id, these too.
            self.response_headers.append(("X-Request-ID", uuid.uuid4().hex))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class DrainingTask(WSGITask):
        """While the server drains (shutting down), every response tells its client to close the connection."""

        def build_response_header(self) -> bytes:
            if self.channel.server.draining:
                self.set_close_on_finish()
            return super().build_response_header()

    class ServingChannel(HTTPChannel):
        """A connection that remembers when its current request began, for the deadlines."""

        error_task_class = JsonErrorTask
        task_class = DrainingTask
        request_started = 0.0

        def received(self, data: bytes) -> bool:
            if self.request is None and data:
                self.request_started = time.monotonic()
            before = self.request
            result = super().received(data)
            if self.request is not None and self.request is not before:  # a pipelined request began
                self.request_started = time.monotonic()
            return result

        def overdue(self, now: float) -> bool:
            """Whether the request being received has taken longer than its deadline."""
            request = self.request
            if request is None or self.requests or self.will_close or self.close_when_flushed:
                return False
            limit = (config.header_timeout_seconds if not request.headers_finished
                     else config.header_timeout_seconds + config.body_timeout_seconds)
            return now - self.request_started > limit

        def time_out(self) -> None:
            """Answer 408 and close (from the I/O thread)."""
            error = RequestTimeoutError(
                f"the request did not arrive in time (headers within {config.header_timeout_seconds:g} s, the body "
                f"within {config.body_timeout_seconds:g} s after them); send it at once")
            payload = json_error_bytes(error)
            with self.outbuf_lock:
                self.outbufs[-1].append(payload)
                self.current_outbuf_count += len(payload)
                self.total_outbufs_len += len(payload)
            self.request = None
            self.close_when_flushed = True

    server = create_server(
        app, host=config.host, port=config.port, threads=config.threads, ident="imgcap",
        # +1: waitress refuses bodies >= its limit, Flask those > MAX_CONTENT_LENGTH; both mean MAX_REQUEST_BYTES.
        max_request_body_size=config.max_request_bytes + 1,
        # Each connection costs only a socket (its I/O is in one thread; workers get whole requests only).
        connection_limit=config.connection_limit,
        channel_timeout=config.idle_timeout_seconds,
        cleanup_interval=CLEANUP_INTERVAL_SECONDS,
        asyncore_use_poll=True,  # select() cannot watch file descriptors above 1024
        # Uploads are ~100 KB: read them in a few large chunks, not 13 trips through waitress' I/O loop.
        recv_bytes=256 * 1024,
    )
    server.channel_class = ServingChannel
    server.draining = False

    def maintenance(now: float) -> None:
        # waitress's own sweep closes every connection idle for IDLE_TIMEOUT_SECONDS, also one in the middle of
        # a request, without a word; here the idle timeout closes keep-alive connections between requests, and a
        # request that stalls gets its 408 at its deadline (headers, then body), as the README says.
        cutoff = now - server.adj.channel_timeout
        monotonic = time.monotonic()
        for channel in list(server.active_channels.values()):
            if channel.overdue(monotonic):
                channel.time_out()
            elif channel.request is None and not channel.requests and channel.last_activity < cutoff:
                channel.will_close = True

    server.maintenance = maintenance
    return server


def raise_open_file_limit(wanted: int) -> None:
    """Let the process hold `wanted` sockets (the soft RLIMIT_NOFILE is often 1024), up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def drain(server: Any, grace_seconds: float) -> bool:
    """Stop accepting, let accepted requests finish (at most `grace_seconds`); True when all finished."""
    from waitress import wasyncore

    server.draining = True
    stopped = threading.Event()

    def stop_listening() -> None:  # runs in the I/O thread, which owns the socket map
        wasyncore.dispatcher.close(server)
        stopped.set()

    server.trigger.pull_trigger(stop_listening)
    stopped.wait(5)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        busy = [channel for channel in list(server.active_channels.values())
                if channel.requests or channel.total_outbufs_len
                or (channel.request is not None and channel.request.headers_finished)]
        if not busy and not server.task_dispatcher.queue:
            return True
        time.sleep(0.05)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the configuration, start serving, load the model, serve until a signal; the exit code."""
    try:
        config = load_config(argv)
        if argv is None:  # run as the program: jemalloc replaces malloc (this may start the command again)
            allocator.preload(config.allocator)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logs.configure_logging(config.log_level, config.log_format)
    raise_open_file_limit(config.connection_limit + 256)
    service = CaptionService(config)
    app = create_app(config, service=service)
    try:
        server = make_server(app, config)
    except OSError as exc:
        log.error("Cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    url = f"http://{config.host}:{server.effective_port}/"
    io_thread = threading.Thread(target=server.run, name="http", daemon=True)
    io_thread.start()
    log.info("Listening on %s; loading the %s model (/readyz answers 503 until it is ready)", url, config.family)

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()
        if not service.ready:  # nothing is being answered yet: stop loading at once
            raise _StopWhileLoading

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    try:
        service.start()
    except _StopWhileLoading:
        log.info("Stopped while loading the model")
        return 0
    except ConfigError as exc:
        return _fatal(config, exc, 2)
    except ModelLoadError as exc:
        return _fatal(config, exc, 1)
    described = service.captioner.describe()
    log.info("Ready on %s: model %s %s on %s as %s, cache %s", url, described["family"], described["id"],
             described["device"], described["dtype"], service.cache.backend)
    stop.wait()
    log.info("Shutting down: no new connections; letting accepted requests finish (at most %g s)",
             config.shutdown_grace_seconds)
    if not drain(server, config.shutdown_grace_seconds):
        log.warning("Requests still running after SHUTDOWN_GRACE_SECONDS=%g; stopping anyway",
                    config.shutdown_grace_seconds)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
    service.stop()
    log.info("Stopped")
    return 0


def _fatal(config: Config, exc: Exception, code: int) -> int:
    """Say why start-up failed, in full: our own multi-line message, which text-format log lines would escape."""
    if config.log_format == "json":
        log.error("%s", exc)
    else:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return code


class _StopWhileLoading(BaseException):
    """Raised in the main thread by a signal that arrives before the model is ready."""
