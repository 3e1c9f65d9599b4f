"""The service's error hierarchy: every error a client can see, with its HTTP status and stable code.

Views and helpers raise these; one handler in app.py turns them into JSON. Nothing here imports Flask.
"""
from __future__ import annotations


class ServiceError(Exception):
    """An error with a stable machine-readable code, a human message and an HTTP status."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}

    def to_dict(self) -> dict[str, str]:
        """The `{"code": …, "message": …}` object used in every error body."""
        return {"code": self.code, "message": self.message}


class BadRequestError(ServiceError):
    """The request as a whole is malformed (no files, bad form fields)."""

    status_code = 400
    code = "bad_request"


class NoImagesError(BadRequestError):
    """The request carried no file under the `images` field."""

    code = "no_images"


class TooManyFilesError(ServiceError):
    """More files in one request than MAX_FILES_PER_REQUEST allows."""

    status_code = 413
    code = "too_many_files"


class RequestTooLargeError(ServiceError):
    """The request body is larger than MAX_REQUEST_BYTES."""

    status_code = 413
    code = "request_too_large"


class BadImageError(ServiceError):
    """One uploaded file cannot be captioned; reported in that file's result, others go on."""

    status_code = 400
    code = "bad_image"


class EmptyFileError(BadImageError):
    """A zero-byte upload."""

    code = "empty_file"


class NotAnImageError(BadImageError):
    """The bytes are not an image in any format we can read (text, HTML, SVG, …)."""

    status_code = 415
    code = "not_an_image"


class UnsupportedFormatError(BadImageError):
    """An image format that is recognised but not on the allow-list."""

    status_code = 415
    code = "unsupported_format"


class CorruptImageError(BadImageError):
    """The header looked like an image but the pixels could not be decoded (truncated, damaged)."""

    status_code = 400
    code = "corrupt_image"


class FileTooLargeError(BadImageError):
    """One file is larger than MAX_FILE_BYTES."""

    status_code = 413
    code = "file_too_large"


class TooManyPixelsError(BadImageError):
    """The image declares more pixels than MAX_IMAGE_PIXELS (a decompression bomb or simply too big)."""

    status_code = 413
    code = "too_many_pixels"


class UnauthorizedError(ServiceError):
    """An admin endpoint called without the right `Authorization: Bearer` token."""

    status_code = 401
    code = "unauthorized"


class OverloadedError(ServiceError):
    """More captioning work is queued than MAX_QUEUE_IMAGES allows; the client should retry later."""

    status_code = 503
    code = "overloaded"


class CaptioningError(ServiceError):
    """The model failed on a batch (an internal fault, not the client's)."""

    status_code = 500
    code = "captioning_failed"


class ConfigError(Exception):
    """A setting or checkpoint that makes start-up impossible; main() prints it and exits 2."""


class ModelLoadError(Exception):
    """Weights could not be obtained or loaded; main() prints it and exits 1."""
