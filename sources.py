"""Images that arrive by value or by reference instead of as multipart files: base64 strings, `data:` URIs and
http(s) URLs, turned into the uploads the service captions.

    sources = ImageSources(config)
    uploads, refused = sources.uploads([Source("a.jpg", data="iVBOR..."), Source(url="https://...")])
    answer = service.caption_uploads(uploads, ask, refused=refused)   # one result per source, in order

A source that cannot become bytes (bad base64, a refused or failing URL) is refused by index with its error
class, so the request's other images are still captioned. URLs of one request are fetched concurrently by
urlfetch.ImageFetcher (addresses checked before connecting, redirects re-checked, size and time bounded) on
the request's own threads: the model thread never waits for the network. Nothing here imports Flask.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence
from urllib.parse import unquote, urlsplit

from errors import FileTooLargeError, ImageUrlsDisabledError, InvalidBase64Error, ServiceError
from service import Upload

if TYPE_CHECKING:
    from config import Config
    from urlfetch import ImageFetcher

_DATA_URI = re.compile(r"data:(?P<type>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_URLSAFE = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class Source:
    """One image of a request given by value (`data`: base64 or a data: URI) or by reference (`url`)."""

    filename: str | None = None
    data: str | None = None
    url: str | None = None


def decode_base64(text: str, max_bytes: int) -> bytes:
    """The bytes of a base64 string or a `data:...;base64,` URI (line breaks and missing padding tolerated; the
    URL-safe alphabet too). Over `max_bytes` decoded: FileTooLargeError, before decoding."""
    match = _DATA_URI.match(text[:512])
    if match:
        if "base64" not in (p.strip().lower() for p in match.group("params").split(";")):
            raise InvalidBase64Error("a data: URI must carry base64 (data:image/png;base64,...)")
        text = text[match.end():]
    elif text[:5].lower() == "data:":
        raise InvalidBase64Error("a data: URI must look like data:image/png;base64,<data>")
    compact = "".join(text.split())
    if len(compact) * 3 // 4 > max_bytes + 2:
        raise FileTooLargeError(f"the image is over {max_bytes} bytes (MAX_FILE_BYTES) once decoded")
    if "-" in compact or "_" in compact:
        compact = compact.translate(_URLSAFE)
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64Error("'data' is not valid base64") from None


def url_filename(url: str) -> str:
    """What a URL's image is called in its result: the last segment of its path (may be empty)."""
    try:
        path = urlsplit(url).path
    except ValueError:
        return ""
    return unquote(path.rsplit("/", 1)[-1])[:255]


class ImageSources:
    """Base64 and URL images of one server, with its limits and URL policy (IMAGE_URLS, IMAGE_URL_*)."""

    def __init__(self, config: "Config") -> None:
        self.config = config
        self._fetcher: "ImageFetcher | None" = None

    @property
    def fetcher(self) -> "ImageFetcher":
        if self._fetcher is None:
            from urlfetch import FetchPolicy, ImageFetcher

            c = self.config
            hosts = frozenset(h.strip().lower() for h in (c.image_url_allowed_hosts or "").split(",") if h.strip())
            self._fetcher = ImageFetcher(FetchPolicy(
                max_bytes=c.max_file_bytes, allowed_hosts=hosts, allow_private=c.image_url_allow_private,
                connect_timeout=min(5.0, c.image_url_timeout_seconds), total_timeout=c.image_url_timeout_seconds))
        return self._fetcher

    def uploads(self, sources: Sequence[Source]) -> tuple[list[Upload], dict[int, ServiceError]]:
        """One upload per source, in order; the sources that gave no bytes are refused (by index, empty upload)."""
        uploads: list[Upload] = []
        refused: dict[int, ServiceError] = {}
        fetch: list[int] = []
        for index, source in enumerate(sources):
            name = source.filename if source.filename is not None else url_filename(source.url or "")
            uploads.append(Upload(name, b""))
            if source.url is not None:
                if not self.config.image_urls:
                    refused[index] = ImageUrlsDisabledError("this server does not fetch image URLs (IMAGE_URLS=off); "
                                                            "send the image itself, as a file or in base64")
                else:
                    fetch.append(index)
                continue
            try:
                uploads[index] = Upload(name, decode_base64(source.data or "", self.config.max_file_bytes))
            except ServiceError as exc:
                refused[index] = exc
        if fetch:
            for index, fetched in zip(fetch, self.fetcher.fetch_many([sources[i].url or "" for i in fetch])):
                if isinstance(fetched, ServiceError):
                    refused[index] = fetched
                else:
                    uploads[index] = Upload(uploads[index].filename, fetched)
        return uploads, refused

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()
