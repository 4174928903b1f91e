"""Request bodies as the service reads them.

- JSON that cannot crash it: a body nested deeper than Python's recursion limit (~2 KB of ``[[[…]]]``)
  raises RecursionError in :func:`json.loads`, which is not a ValueError and reached the catch-all as a
  500. Here it is a JSONDecodeError, so Flask and webargs answer 400.
- Multipart parts kept as bytes: a part sent without a file name (``curl -F 'image=<photo.jpg'``) is a
  form field to Werkzeug, decoded as UTF-8 with replacement, which destroys an image. A field whose
  Content-Type is not text is decoded as Latin-1 here instead (one character per byte), so
  :func:`part_bytes` gives back exactly the bytes sent."""

from __future__ import annotations

import json
from typing import Any

from flask import Request
from flask.json.provider import DefaultJSONProvider
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.datastructures import Headers
from werkzeug.formparser import FormDataParser, MultiPartParser


def loads(data: str | bytes, **kwargs: Any) -> Any:
    """:func:`json.loads` that reports too deep nesting as a :class:`json.JSONDecodeError`."""
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        text = data if isinstance(data, str) else data[:64].decode("utf-8", "replace")
        raise json.JSONDecodeError("the JSON body is nested too deeply", text[:64], 0) from None


class SafeJSONProvider(DefaultJSONProvider):
    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s, **kwargs)


class SafeParser(FlaskParser):
    """webargs' Flask parser (flask-smorest's ``@blp.arguments``) with the same JSON loading."""

    def _raw_load_json(self, req: Any) -> Any:
        if not is_json_request(req):
            return core.missing
        return loads(req.get_data(cache=True).decode("utf-8"))  # not UTF-8: webargs answers 400


class _BinaryFieldParser(MultiPartParser):
    def get_part_charset(self, headers: Headers) -> str:
        kind = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind and not kind.startswith("text/"):
            return "latin-1"  # lossless: part_bytes() encodes it back
        return super().get_part_charset(headers)


class _FormParser(FormDataParser):
    def _parse_multipart(
        self, stream: Any, mimetype: str, content_length: int | None, options: dict[str, str]
    ) -> Any:
        parser = _BinaryFieldParser(
            stream_factory=self.stream_factory,
            max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts,
            cls=self.cls,
        )
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


class ThaliRequest(Request):
    form_data_parser_class = _FormParser


def part_bytes(text: str) -> bytes:
    """The bytes of a multipart field (see the module docstring); text that is not Latin-1 was a text
    part, and comes back as its UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")
