"""Reading an uploaded photo safely: in memory only, size-capped while it streams, type sniffed from bytes.

Starlette's own form parser spools large files to a temporary file on disk; an upload here never touches the
disk, and the byte cap is enforced chunk by chunk so an oversized body is refused before it is all read.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

# ALLOWED_FORMATS (re-exported here): the one decoder policy, shared with the CLI's load_image; sniffing is
# restricted to these so exotic decoders (EPS -> Ghostscript, etc.) are never reached with untrusted bytes.
from mpoxscope.data.images import ALLOWED_FORMATS, MAX_PIXELS, decode_image
from mpoxscope.errors import ImageError

__all__ = ["ALLOWED_FORMATS", "DecodedImage", "Upload", "UploadError", "decode_upload", "read_upload",
           "sniff_image"]

#: Room for multipart boundaries and part headers on top of the file itself.
MULTIPART_OVERHEAD = 64 * 1024


class UploadError(Exception):
    """A client mistake with the HTTP status that says so (400, 413, 415, 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """The bytes of one uploaded file and the name the client gave it (for messages only, never a path)."""

    data: bytes
    filename: str


@dataclass
class DecodedImage:
    """An upload decoded to 8-bit RGB; ``format`` and ``size`` are as sniffed from the bytes."""

    image: Image.Image
    format: str
    size: tuple[int, int]


class _PartCollector:
    """python-multipart callbacks that keep the one wanted field in memory and count every other part."""

    def __init__(self, field: str, max_bytes: int) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self.found: Upload | None = None
        self.other_fields: list[str] = []  # the first few, for the message (a body may hold 100,000 parts)
        self.n_other_fields = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._filename = ""
        self._buffer: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition, self._name, self._filename, self._buffer = b"", "", "", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._filename = options.get(b"filename", b"").decode("utf-8", "replace")
        if self._name == self.field and self.found is None:
            self._buffer = bytearray()
        else:
            self.n_other_fields += 1
            if len(self.other_fields) < 5:
                self.other_fields.append(self._name[:40])

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._buffer is None:  # a part we do not want: drop its bytes as they stream past
            return
        if len(self._buffer) + (end - start) > self.max_bytes:
            raise UploadError(413, f"{self.field}: upload larger than the limit of {_mb(self.max_bytes)}")
        self._buffer += data[start:end]

    def on_part_end(self) -> None:
        if self._buffer is not None:
            self.found = Upload(bytes(self._buffer), self._filename or "upload")
            self._buffer = None


def _mb(n: int) -> str:
    return f"{n / 1_000_000:g} MB"


async def read_upload(stream: AsyncIterator[bytes], content_type: str | None, content_length: str | None,
                      field: str = "file", max_bytes: int = 20_000_000) -> Upload:
    """Read the multipart field ``field`` from a request body into memory.

    Raises :class:`UploadError`: 415 when the body is not multipart/form-data, 413 past ``max_bytes`` (checked
    against Content-Length first, then while streaming), 400 for a missing field, an empty file or broken
    multipart framing.
    """
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError(415, f"send the photo as multipart/form-data in a field named {field!r} "
                               f"(got Content-Type {content_type or 'none'!r})")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    body_cap = max_bytes + MULTIPART_OVERHEAD
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > body_cap:
        raise UploadError(413, f"{field}: upload larger than the limit of {_mb(max_bytes)}")
    collector = _PartCollector(field, max_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
    except (FormParserError, ValueError) as e:
        raise UploadError(400, f"invalid multipart boundary ({e})") from None
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > body_cap:  # e.g. many parts of junk beside a small file, or a lying Content-Length
                raise UploadError(413, f"{field}: upload larger than the limit of {_mb(max_bytes)}")
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise UploadError(400, f"invalid multipart body ({e})") from None
    if collector.found is None:
        more = collector.n_other_fields - len(collector.other_fields)
        others = (", ".join(repr(n) for n in collector.other_fields) or "none") + (f" and {more} more" if more else "")
        raise UploadError(400, f"no field named {field!r} in the form (fields sent: {others}); "
                               f"send the photo as {field}=@photo.jpg")
    if not collector.found.data:
        raise UploadError(400, f"{field}: empty file")
    return collector.found


def sniff_image(data: bytes, name: str = "upload",
                max_pixels: int = MAX_PIXELS) -> tuple[str, tuple[int, int]]:
    """(format, (width, height)) from the image header alone, without decoding pixels.

    Raises :class:`UploadError` 415 for bytes that are not an allowed image format, 413 for too many pixels.
    """
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            fmt, size = str(img.format), img.size
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not a supported image (send JPEG, PNG, WebP, AVIF, BMP, GIF or "
                               "TIFF)") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name}: image has too many pixels (limit {max_pixels:,})") from None
    except Exception as e:  # a corrupt header can raise anything (struct.error, IndexError...)
        raise UploadError(422, f"{name}: cannot read image header ({type(e).__name__}: {e})") from None
    if size[0] * size[1] > max_pixels:
        raise UploadError(413, f"{name}: image has too many pixels ({size[0]}x{size[1]}; "
                               f"limit {max_pixels:,})")
    return fmt, size


def decode_upload(data: bytes, name: str = "upload", max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Sniff, check limits, then decode (EXIF-rotated, any mode -> RGB) with :func:`decode_image`."""
    fmt, size = sniff_image(data, name, max_pixels)
    try:
        image = decode_image(data, name)
    except ImageError as e:
        raise UploadError(422, f"{name}: {e.reason}") from None
    except Exception as e:  # decoders fed hostile bytes fail in many ways; all mean "bad file"
        raise UploadError(422, f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return DecodedImage(image, fmt, size)
