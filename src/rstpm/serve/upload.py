"""What a client sends, checked: content type, body size, multipart, and the image's bytes.

Every refusal is an :class:`UploadError` with an HTTP status and a one-line message that names
the problem. The body is read in memory only (never a file, never a path the client names), up
to the size limit, which is checked on ``Content-Length`` and again on the bytes as they arrive.

Images are decoded like ``rstpm predict`` decodes files (:func:`rstpm.data.images.open_image`):
the first frame, fully loaded, in its own mode; colour conversion and resizing then happen in
:class:`~rstpm.inference.detector.Detector` exactly as for a file. Only PNG, JPEG, BMP and TIFF
are decoded, whatever the declared type: no other PIL decoder (some call external programs)
ever sees a client's bytes (rstpm.data.images.IMAGE_FORMATS, as for files). Images above
``RSTPM_MAX_IMAGE_PIXELS`` are refused from their header, before decoding.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncGenerator

from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from rstpm.data.images import (
    IMAGE_FORMATS,
    DataError,
    ImageTooLarge,
    decode_image_bytes,
    max_image_pixels,
)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff")
"""Content types accepted as a raw image body (``multipart/form-data`` takes a ``file`` part)."""


MULTIPART = "multipart/form-data"
FILE_FIELD = "file"


class UploadError(Exception):
    """A request refused for what the client sent: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(headers: Headers) -> str:
    """The content type without parameters, lower case ("" when absent)."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_content_type(headers: Headers) -> str:
    """The request's media type when it is an accepted one.

    Raises:
        UploadError: 415 for any other type.
    """
    kind = media_type(headers)
    if kind not in (*IMAGE_TYPES, MULTIPART):
        shown = kind or "none"
        raise UploadError(
            415,
            f"unsupported content type {shown[:80]!r}: send the image as the raw body with "
            f"Content-Type {', '.join(IMAGE_TYPES)}, or as {MULTIPART} with a part "
            f"'{FILE_FIELD}'",
        )
    return kind


def _too_large(limit: int) -> UploadError:
    return UploadError(
        413, f"request body larger than the server's limit of {limit:,} bytes (--max-body-mb)"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused beyond ``limit`` bytes: on ``Content-Length`` before reading,
    and while counting the bytes that arrive (a missing or lying header changes nothing).

    Raises:
        UploadError: 413 over the limit, 400 for a malformed Content-Length.
        ClientDisconnect: the client went away before the body was complete.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise UploadError(400, f"malformed Content-Length header {declared[:40]!r}")
        if int(declared) > limit:
            raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _one_chunk(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def multipart_file(headers: Headers, body: bytes) -> tuple[bytes, str | None]:
    """The bytes and the file name of the multipart part ``file`` of an in-memory body.

    Raises:
        UploadError: 400 for a malformed body, no part ``file``, or a ``file`` that is a text
            field.
    """
    parser = MultiPartParser(headers, _one_chunk(body), max_files=1, max_fields=16)
    parser.spool_max_size = len(body) + 1  # the part stays in memory: no temporary file
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise UploadError(400, f"malformed multipart body: {error}") from error
    try:
        part = form.get(FILE_FIELD)
        if part is None:
            raise UploadError(400, f"multipart body has no part '{FILE_FIELD}' (the image)")
        if not isinstance(part, UploadFile):
            raise UploadError(400, f"multipart part '{FILE_FIELD}' is a text field, not a file")
        return await part.read(), part.filename
    finally:
        await form.close()


def header_pixels(data: bytes) -> int:
    """The image's width x height, read from its header without decoding the pixels.

    Raises:
        UploadError: what :func:`decode_image` answers for bytes whose header cannot be read
            (400 empty, 413 over the pixel limit, 422 not an image of an accepted format).
    """
    if not data:
        raise UploadError(400, "empty image (0 bytes): send the image's bytes")
    limit = max_image_pixels()
    Image.MAX_IMAGE_PIXELS = limit  # as rstpm.data.images does before each read
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                width, height = img.size
    except Exception:  # noqa: BLE001 - the decoder's own check gives the one-line answer
        decode_image(data)
        raise UploadError(
            422, "cannot read the image's header; send a PNG, JPEG, BMP or TIFF"
        ) from None
    if width * height > limit:
        decode_image(data)  # refuses it from the header with rstpm's message (413)
    return width * height


def decode_image(data: bytes) -> Image.Image:
    """The image in ``data``, decoded as ``rstpm predict`` decodes a file
    (:func:`rstpm.data.images.decode_image_bytes`: PNG, JPEG, BMP or TIFF, first frame).

    Raises:
        UploadError: 400 empty, 413 over the pixel limit, 422 not an image of an accepted
            format, truncated or damaged.
    """
    if not data:
        raise UploadError(400, "empty image (0 bytes): send the image's bytes")
    try:
        return decode_image_bytes(data, name="in the request body")
    except ImageTooLarge as error:
        raise UploadError(413, str(error)) from error
    except DataError as error:
        raise UploadError(422, str(error)) from error
