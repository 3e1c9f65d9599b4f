"""Logging set-up: plain text or one JSON object per line (LOG_FORMAT=json), with the request id on each line."""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Adds the id of the request being served (or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines; the request id, when there is one, in brackets.

    A message is one line whatever a client put into it (a path, a header): control characters are escaped,
    so that nobody can forge a log line with CR/LF. Tracebacks, which come from the program, stay as they are.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.rid = f" [{escape_controls(str(rid))}]" if rid else ""
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def escape_controls(text: str) -> str:
    """`text` with its C0 control characters (CR, LF, ESC, ...) and DEL written as escapes."""
    return text.translate(_CONTROLS)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send all logs (ours, waitress', transformers') to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log lines too, so JSON logs stay one object per line
    try:  # transformers has its own stderr handler; route its records through ours instead
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with log lines
        if fmt == "json":  # download bars too: in JSON mode every line must be one object
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    except ImportError:
        pass
