"""A quarantined message made safe to show: header fields and the text a reader would see.

The text is what the page shows: HTML parts rendered to text by
:mod:`gateway.content` (the same bounded walk the policies use), plain text
for the templates to escape (jinja2 autoescaping) or for JSON. ``html``, the
first HTML part's source, is only ever served by the sandboxed view
(``/m/{id}/html``: CSP ``sandbox``, no script, nothing fetched). Bounded
like the pipeline: a hostile message costs a preview no more than it cost
its scan. CPU work: call in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, TypeVar

from gateway.content import body_text, mime_structure, text_parts
from gateway.engine import parse_message

__all__ = ["Preview", "preview"]

_T = TypeVar("_T")
MAX_TEXT = 20_000  # characters of body text shown
MAX_HEADERS = 100  # header fields shown
MAX_VALUE = 998  # characters of one header value shown


@dataclass(frozen=True, slots=True)
class Preview:
    headers: tuple[tuple[str, str], ...]  # (name, decoded value), in message order
    text: str
    truncated: bool
    attachments: tuple[str, ...]  # content types
    html: str = ""  # the first HTML part's source (capped): only ever served sandboxed

    def to_json(self) -> dict[str, Any]:
        return {
            "headers": [{"name": n, "value": v} for n, v in self.headers],
            "text": self.text,
            "text_truncated": self.truncated,
            "attachments": list(self.attachments),
        }


class _Message:
    """The little of :class:`gateway.api.Context` that :mod:`gateway.content` needs."""

    def __init__(self, message: EmailMessage) -> None:
        self.message = message
        self._memo: dict[Callable[..., Any], Any] = {}

    def memo(self, fn: Callable[[Any], _T]) -> _T:
        if fn not in self._memo:
            self._memo[fn] = fn(self)
        return self._memo[fn]  # type: ignore[no-any-return]


def _printable(text: str, limit: int) -> str:
    return "".join(c if c.isprintable() or c in "\n\t" else " " for c in text)[:limit]


def preview(raw: bytes) -> Preview:
    """Header fields (decoded, bounded) and body text (HTML rendered to text) of ``raw``."""
    message = parse_message(raw)
    ctx = _Message(message)
    headers = []
    for name, value in list(message.raw_items())[:MAX_HEADERS]:
        try:
            shown = str(message.policy.header_fetch_parse(name, value))
        except Exception:  # a header the parser cannot decode: show it as it came
            shown = str(value)
        headers.append((_printable(name, 100), _printable(" ".join(shown.split()), MAX_VALUE)))
    text = body_text(ctx)
    structure = mime_structure(ctx)
    html = next((p.raw_html for p in text_parts(ctx) if p.is_html), "")
    return Preview(
        tuple(headers),
        _printable(text[:MAX_TEXT], MAX_TEXT),
        len(text) > MAX_TEXT,
        tuple(structure.attachments),
        html,
    )
