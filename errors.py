"""The service's error hierarchy: every error a client can see, one class per stable code, with its HTTP status.

This module is the only place where an error code is written down: the service and the web layer raise these
classes, one handler in app.py turns them into JSON, and the OpenAPI document and the tests read the codes,
statuses and descriptions (the docstrings) from here. Adding an error is adding a class. Nothing here imports
Flask.
"""
from __future__ import annotations

from typing import Iterator


class ServiceError(Exception):
    """An error with a stable machine-readable code, a human message and an HTTP status.

    Concrete errors are subclasses that set `code` and `status_code`; `retry_after` (seconds) says when a
    client may try again (the web layer sends it as `Retry-After`). `scope` says where the error can appear:
    in the answer to the whole request, in one file's result, or both.
    """

    status_code: int = 500
    code: str = ""
    scope: frozenset[str] = frozenset({"request"})

    def __init__(self, message: str, *, retry_after: int | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.param = param  # the request field at fault, when there is one (OpenAI's error `param`)

    def to_dict(self) -> dict[str, str]:
        """The `{"code": …, "message": …}` object used in every error body."""
        return {"code": self.code, "message": self.message}


def error_classes() -> dict[str, type[ServiceError]]:
    """Every concrete error class by its code (the single list of codes)."""
    def walk(cls: type[ServiceError]) -> Iterator[type[ServiceError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from walk(sub)

    found: dict[str, type[ServiceError]] = {}
    for cls in walk(ServiceError):
        if cls.code and cls.__dict__.get("code"):
            if cls.code in found and found[cls.code] is not cls:
                raise AssertionError(f"error code {cls.code!r} is declared twice: {found[cls.code]} and {cls}")
            found[cls.code] = cls
    return found


def description(cls: type[ServiceError]) -> str:
    """The one-paragraph description of an error class (its docstring, on one line)."""
    return " ".join((cls.__doc__ or "").split())


# ----- the whole request -------------------------------------------------------------------------------------
class InternalError(ServiceError):
    """An unexpected server fault (logged; no details are returned)."""

    code = "internal_error"


class BadRequestError(ServiceError):
    """A malformed request (an HTTP-level refusal, such as a broken multipart body)."""

    status_code = 400
    code = "bad_request"


class NoImagesError(BadRequestError):
    """The request carried no file under the form field `images`."""

    code = "no_images"


class InvalidPromptError(BadRequestError):
    """The prompt holds a special or control token of the model's tokenizer (an image placeholder, a chat-turn
    marker): prompts are plain text."""

    code = "invalid_prompt"


class PromptTooLongError(BadRequestError):
    """The prompt is over the character limit, or leaves the model no room for the new tokens."""

    code = "prompt_too_long"
    scope = frozenset({"request", "file"})  # a file can also be one whose image makes too many tokens


class InvalidBodyError(BadRequestError):
    """The JSON body is not valid JSON, or not the documented shape (a missing, unknown or mistyped field; the
    message names it)."""

    code = "invalid_body"


class InvalidOptionError(BadRequestError):
    """A generation option outside what this server allows (`max_new_tokens` above MAX_NEW_TOKENS, `num_beams`
    above MAX_NUM_BEAMS, a `temperature` other than 0, `n` other than 1); the message names the bound."""

    code = "invalid_option"


class UnreadablePartError(BadRequestError):
    """A part of the multipart body could not be read (its headers or its text field are malformed)."""

    code = "unreadable_part"


class HostNotAllowedError(BadRequestError):
    """The request's Host is not one of ALLOWED_HOSTS (a protection against DNS rebinding)."""

    code = "host_not_allowed"


class InvalidApiKeyError(ServiceError):
    """API_KEY is set and the request's `Authorization: Bearer` key is missing or wrong."""

    status_code = 401
    code = "invalid_api_key"


class UnauthorizedError(ServiceError):
    """/reset-redis without the right `Authorization: Bearer <ADMIN_TOKEN>`."""

    status_code = 401
    code = "unauthorized"


class CrossSiteRequestError(ServiceError):
    """A browser request from another site to an endpoint that changes state (/reset-redis)."""

    status_code = 403
    code = "cross_site_request"


class NotFoundError(ServiceError):
    """No such path (or no such file under /static)."""

    status_code = 404
    code = "not_found"


class MethodNotAllowedError(ServiceError):
    """The path does not accept this method (see the Allow header)."""

    status_code = 405
    code = "method_not_allowed"


class RequestTimeoutError(ServiceError):
    """The request's headers or body did not arrive in time (HEADER_TIMEOUT_SECONDS, BODY_TIMEOUT_SECONDS)."""

    status_code = 408
    code = "request_timeout"


class RequestTooLargeError(ServiceError):
    """The body is larger than MAX_REQUEST_BYTES, or has too many parts."""

    status_code = 413
    code = "request_too_large"


class TooManyFilesError(ServiceError):
    """More files than MAX_FILES_PER_REQUEST."""

    status_code = 413
    code = "too_many_files"


class UnsupportedMediaTypeError(ServiceError):
    """An unsupported request media type."""

    status_code = 415
    code = "unsupported_media_type"


class HeadersTooLargeError(ServiceError):
    """The request headers are too large."""

    status_code = 431
    code = "headers_too_large"


class HttpError(ServiceError):
    """Any other HTTP-level refusal, with its own HTTP status."""

    status_code = 400
    code = "http_error"


class NotImplementedHttpError(ServiceError):
    """An HTTP feature the server does not implement (an unknown Transfer-Encoding)."""

    status_code = 501
    code = "not_implemented"


class NotReadyError(ServiceError):
    """The model is still loading; retry after Retry-After seconds."""

    status_code = 503
    code = "not_ready"


class OverloadedError(ServiceError):
    """More images are queued than MAX_QUEUE_IMAGES; retry after Retry-After seconds."""

    status_code = 503
    code = "overloaded"


class CacheUnavailableError(ServiceError):
    """/reset-redis could not reach Redis."""

    status_code = 503
    code = "cache_unavailable"


# ----- one file of a request ---------------------------------------------------------------------------------
class BadImageError(ServiceError):
    """The file cannot be captioned (generic)."""

    status_code = 400
    code = "bad_image"
    scope = frozenset({"file"})


class EmptyFileError(BadImageError):
    """A zero-byte file."""

    code = "empty_file"


class NotAnImageError(BadImageError):
    """The bytes are not an image in any format we can read (text, HTML, SVG, ...)."""

    status_code = 415
    code = "not_an_image"


class UnsupportedFormatError(BadImageError):
    """An image format that is recognised but not accepted."""

    status_code = 415
    code = "unsupported_format"


class CorruptImageError(BadImageError):
    """The header looks like an image but the pixels cannot be decoded (truncated, damaged)."""

    status_code = 400
    code = "corrupt_image"


class FileTooLargeError(BadImageError):
    """The file is larger than MAX_FILE_BYTES."""

    status_code = 413
    code = "file_too_large"


class TooManyPixelsError(BadImageError):
    """The image declares more pixels than MAX_IMAGE_PIXELS (a decompression bomb, or simply too big)."""

    status_code = 413
    code = "too_many_pixels"


class UnreadableFileError(BadImageError):
    """Bulk captioning: an input file (or archive member) could not be read (it vanished, no permission, a
    damaged archive)."""

    code = "unreadable_file"


class InvalidBase64Error(BadImageError):
    """An image's `data` is not valid base64 (or a `data:` URI whose payload is not)."""

    code = "invalid_base64"


class ImageUrlsDisabledError(BadImageError):
    """An image given by URL while this server does not fetch URLs (IMAGE_URLS=off)."""

    code = "image_urls_disabled"


class UrlNotAllowedError(BadImageError):
    """An image URL this server will not fetch: not http(s), or its host resolves to a loopback, private,
    link-local, multicast, reserved or metadata address (IMAGE_URL_ALLOWED_HOSTS, IMAGE_URL_ALLOW_PRIVATE), or
    it redirects to one, or redirects too often."""

    code = "url_not_allowed"


class UrlFetchFailedError(BadImageError):
    """An image URL could not be fetched: no answer within the timeout, a connection error, or an HTTP error
    status."""

    status_code = 502
    code = "url_fetch_failed"


class UrlTooLargeError(BadImageError):
    """An image URL's body is larger than MAX_FILE_BYTES (reading stopped at the limit)."""

    status_code = 413
    code = "url_too_large"


class CaptioningError(ServiceError):
    """The model failed on this file's batch (a server fault, not the client's)."""

    status_code = 500
    code = "captioning_failed"
    scope = frozenset({"file"})


# ----- start-up ------------------------------------------------------------------------------------------------
class ConfigError(Exception):
    """A setting or checkpoint that makes start-up impossible; main() prints it and exits 2."""


class ModelLoadError(Exception):
    """Weights could not be obtained or loaded; main() prints it and exits 1."""
