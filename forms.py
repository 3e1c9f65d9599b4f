"""Reading a multipart/form-data upload so that every part is accounted for (web layer; used by app.py).

Werkzeug's form parser drops a file part whose filename holds a bare CR or LF (the header line breaks there
and the part becomes a text field), and loses the whole form when a filename is not UTF-8. Here every part
sent under `images` becomes one upload, in order, whatever its headers; a filename is decoded leniently
(UTF-8, else Latin-1; `filename*` per RFC 5987 when given) and kept as data. Parsing is werkzeug's own
streaming decoder with a lenient header reader in front of it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import IO, NoReturn
from urllib.parse import quote, unquote

from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import parse_options_header
from werkzeug.sansio.multipart import Data, Epilogue, Event, Field, File, MultipartDecoder, NeedData, State

from errors import HeadersTooLargeError, RequestTooLargeError, UnreadablePartError
from service import Upload

FILE_FIELD = "images"
CHUNK_BYTES = 256 * 1024
MAX_FIELD_BYTES = 64 * 1024  # a text field (the prompt) is short; more is refused, never buffered
# A part's headers (a file name, its Content-Type) are bounded as the request's own headers are (waitress's
# 256 KiB): reading a header block costs more than linear time in its size, and tens of MB of one held the GIL
# for a minute.
MAX_PART_HEADER_BYTES = 256 * 1024

# Without CRLF a header block is split at a bare CR or LF only where the next line starts a header field
# ("Name:") or folds one (a space or tab): a single header line keeps the CR or LF inside its file name.
_BARE_LINE_BREAK = re.compile(rb"[\r\n](?=[ \t]|[!#$%&'*+.^_`|~0-9A-Za-z-]+[ \t]*:)")
_PARAM = re.compile(rb';\s*([^\s;=]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)', re.DOTALL)


@dataclass
class Form:
    """The parts of one request: the uploads under `images` in order, the text fields, other file fields."""

    uploads: list[Upload] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    other_file_fields: list[str] = field(default_factory=list)


def read_form(stream: IO[bytes], content_type: str, *, max_parts: int) -> Form:
    """Parse a multipart/form-data body (an empty Form for any other content type).

    Raises UnreadablePartError (400) for a body that cannot be parsed at all or a text field that is not UTF-8
    text, RequestTooLargeError (413) for more than `max_parts` parts or an oversize text field.
    """
    mimetype, options = parse_options_header(content_type)
    if mimetype != "multipart/form-data":
        return Form()
    boundary = options.get("boundary", "")
    if not boundary:
        raise UnreadablePartError("the multipart/form-data body has no boundary in its Content-Type; send "
                                  "'multipart/form-data; boundary=...' (curl -F and HTTP libraries do)")
    decoder = _LenientDecoder(boundary.encode("latin-1", "replace"), max_parts=max_parts)
    form, part, data, number = Form(), None, bytearray(), 0
    try:
        while True:
            chunk = stream.read(CHUNK_BYTES)
            decoder.receive_data(chunk or None)
            while not isinstance(event := decoder.next_event(), NeedData):
                if isinstance(event, (Field, File)):
                    part, data, number = event, bytearray(), number + 1
                elif isinstance(event, Data):
                    if part.name == FILE_FIELD or not isinstance(part, File):  # other files: not kept
                        data += event.data
                    if part.name != FILE_FIELD and len(data) > MAX_FIELD_BYTES:
                        raise RequestTooLargeError(f"the form field {part.name!r} is over {MAX_FIELD_BYTES} bytes")
                    if not event.more_data:
                        _add(form, part, bytes(data), number)
                elif isinstance(event, Epilogue):
                    return form
            if not chunk:
                return form
    except RequestEntityTooLarge:
        raise RequestTooLargeError(f"the form has more than {max_parts} parts") from None
    except ValueError as exc:  # werkzeug: no boundary, a part without Content-Disposition, a cut-off body
        where = f" (after part {number})" if number else ""
        raise UnreadablePartError(f"the multipart body could not be read{where}: {exc}") from None


def _add(form: Form, part: Field | File, data: bytes, number: int) -> None:
    name = part.name or ""  # a part whose Content-Disposition has no name
    if name == FILE_FIELD:
        form.uploads.append(Upload(part.filename if isinstance(part, File) else "", data))
    elif isinstance(part, File):
        form.other_file_fields.append(name)
    elif name not in form.fields:
        try:
            form.fields[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UnreadablePartError(f"the form field {name!r} (part {number}) is not UTF-8 text") from None


class _LenientDecoder(MultipartDecoder):
    """werkzeug's decoder, reading each part's headers leniently (see the module docstring), at most
    MAX_PART_HEADER_BYTES of them."""

    def next_event(self) -> Event:
        event = super().next_event()
        if isinstance(event, NeedData) and self.state == State.PART and len(self.buffer) > MAX_PART_HEADER_BYTES:
            self._refuse_headers()  # refused as soon as they pass the limit, not after all of them arrived
        return event

    def _refuse_headers(self) -> NoReturn:
        raise HeadersTooLargeError(f"the headers of part {self._parts_decoded + 1} of the multipart body are over "
                                   f"{MAX_PART_HEADER_BYTES // 1024} KiB (a file name is at most that long)")

    def _parse_headers(self, data: bytes | bytearray) -> Headers:
        if len(data) > MAX_PART_HEADER_BYTES:
            self._refuse_headers()
        data = bytes(data)
        # Header lines end with CRLF; a bare CR or LF inside a line is part of it (a filename may hold one).
        # Only a client that never uses CRLF gets its lines split at bare line breaks (_BARE_LINE_BREAK).
        lines = data.split(b"\r\n") if b"\r\n" in data else _BARE_LINE_BREAK.split(data)
        merged: list[bytes] = []
        for line in lines:
            if line[:1] in (b" ", b"\t") and merged:  # a folded continuation line
                merged[-1] += b" " + line.strip(b" \t")
            elif line.strip(b" \t"):
                merged.append(line.strip(b" \t"))
        headers = Headers()
        for line in merged:
            name, _, value = line.partition(b":")
            name_text = _text(name).strip()
            if name_text.lower() == "content-disposition":
                headers.add(name_text, _canonical_disposition(value.strip()))
            else:
                headers.add(name_text, _text(value).strip())
        return headers


def _canonical_disposition(value: bytes) -> str:
    """A Content-Disposition value rewritten so that werkzeug's strict parser reads back exactly the name and
    filename the client meant: both travel percent-encoded (RFC 2231), whatever bytes they held."""
    kind = _text(value.split(b";", 1)[0]).strip() or "form-data"
    params: dict[str, str] = {}
    for raw_name, raw_value in _PARAM.findall(value):
        name = _text(raw_name).strip().lower()
        if raw_value.startswith(b'"'):
            raw_value = raw_value[1:-1] if raw_value.endswith(b'"') and len(raw_value) > 1 else raw_value[1:]
            # Quoted-pairs as curl writes them; %22 as browsers write a quote (werkzeug reads it so too).
            raw_value = raw_value.replace(b'\\"', b'"').replace(b"\\\\", b"\\").replace(b"%22", b'"')
        text = _text(raw_value)
        if name.endswith("*"):  # RFC 5987: charset'language'percent-encoded
            charset, _, rest = text.partition("'")
            _, _, encoded = rest.partition("'")
            try:
                params[name[:-1]] = unquote(encoded, encoding=charset or "utf-8", errors="replace")
            except LookupError:
                params[name[:-1]] = unquote(encoded, errors="replace")
        else:
            params.setdefault(name, text)
    out = kind
    for name in ("name", "filename"):
        if name in params:
            out += f"; {name}=\"\"" if not params[name] else f"; {name}*=UTF-8''{quote(params[name], safe='')}"
    return out


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
