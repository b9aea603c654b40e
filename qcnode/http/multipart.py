"""multipart/related (RFC 2387, RFC 2046 5.1) over a body already on disk: media types and part spans.

The body is scanned through a memory map, so a request of gigabytes costs page cache, not memory;
each part is read (copied) only when it is stored. The framing is checked as a whole before any
part is used: a missing boundary, a truncated last part or a missing close delimiter make the
request malformed (400), and nothing of it is stored.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

MAX_PART_HEADERS = 16384  # bytes of headers per part at most
MAX_BOUNDARY = 256        # RFC 2046 says 70; Orthanc 1.10 sends longer ones
MAX_PARTS = 10_000        # instances per STOW-RS request at most (each part costs memory and a record)


class MultipartError(ValueError):
    """The body is not well-formed multipart (answered 400)."""


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` (lower case) and the parameters (names lower case, quotes removed) of a
    Content-Type header value."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    while rest:
        rest = rest.lstrip(" \t;")
        name, eq, rest = rest.partition("=")
        if not eq:
            break
        rest = rest.lstrip(" \t")
        if rest.startswith('"'):  # quoted-string, with backslash escapes
            out, i = [], 1
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                out.append(rest[i])
                i += 1
            param, rest = "".join(out), rest[i + 1:]
        else:
            param, _, rest = rest.partition(";")
            param = param.strip()
        params[name.strip().lower()] = param
    return media.strip().lower(), params


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names lower case) and its content's span in the body."""
    headers: dict[str, str]
    start: int
    end: int

    @property
    def media_type(self) -> str:
        return parse_media_type(self.headers.get("content-type", ""))[0]


def split_parts(body: mmap.mmap | bytes, boundary: str) -> list[Part]:
    """The parts of a multipart body with this boundary; raises MultipartError if malformed."""
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise MultipartError(f"the boundary parameter must be 1-{MAX_BOUNDARY} characters")
    try:
        dash = b"--" + boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise MultipartError("the boundary must be ASCII") from exc
    delimiter = b"\r\n" + dash
    if body[:len(dash)] == dash:
        pos = len(dash)
    else:  # after a preamble
        found = body.find(delimiter)
        if found < 0:
            raise MultipartError("the body holds no boundary delimiter")
        pos = found + len(delimiter)
    parts: list[Part] = []
    size = len(body)
    while True:
        if body[pos:pos + 2] == b"--":  # close delimiter (an epilogue may follow)
            if not parts:
                raise MultipartError("the body holds no part")
            return parts
        eol = body.find(b"\r\n", pos, pos + 256)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # only transport padding may follow a boundary
            raise MultipartError("malformed boundary line" if pos < size else "the body ends after a boundary")
        head = eol + 2
        if body[head:head + 2] == b"\r\n":
            headers, start = {}, head + 2
        else:
            end = body.find(b"\r\n\r\n", head, head + MAX_PART_HEADERS)
            if end < 0:
                raise MultipartError(f"part {len(parts) + 1}: headers not terminated")
            headers, start = _headers(body[head:end], len(parts) + 1), end + 4
        nxt = body.find(delimiter, start)
        if nxt < 0:
            raise MultipartError(f"part {len(parts) + 1} is truncated (no boundary after it)")
        parts.append(Part(headers, start, nxt))
        if len(parts) > MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS} parts in one request: send fewer instances per request")
        pos = nxt + len(delimiter)


def _headers(block: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError(f"part {number}: malformed header line")
        headers[name.strip().lower()] = value.strip()
    return headers
