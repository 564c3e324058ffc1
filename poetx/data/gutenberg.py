"""Removal of Project Gutenberg headers, footers and licence notices from a text."""

from __future__ import annotations

import re

# The text starts after the last line that matches one of these (header, small print).
_START_MARKERS = re.compile(
    r"^.*(?:"
    r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|\*\s*END\s*\*?\s*THE SMALL PRINT"
    r"|This etext was prepared by"
    r").*$",
    re.IGNORECASE | re.MULTILINE,
)
# The text ends before the first line that matches one of these.
_END_MARKERS = re.compile(
    r"^.*(?:"
    r"\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|End of (?:the |this )?Project Gutenberg"
    r").*$",
    re.IGNORECASE | re.MULTILINE,
)
# Notices that the 1990s Shakespeare etexts repeat between scenes.
_INLINE_NOTICES = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>\n?", re.IGNORECASE | re.DOTALL)

# A header is never further than this into a file; a marker-like line later is part of the work.
_HEADER_WINDOW = 0.5


def strip_gutenberg_boilerplate(text: str) -> str:
    """Return only the work inside a Project Gutenberg etext.

    Line endings become ``\\n``; the header (up to the START marker or the end of the small print),
    the footer (from the END marker) and inline licence notices are cut, and surrounding blank
    lines stripped. A text without markers is returned with only that normalisation, so the
    function is idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = 0
    for match in _START_MARKERS.finditer(text, 0, int(len(text) * _HEADER_WINDOW)):
        start = match.end()
    end_match = _END_MARKERS.search(text, start)
    end = end_match.start() if end_match else len(text)
    body = _INLINE_NOTICES.sub("", text[start:end])
    return body.strip("\n").rstrip() + "\n" if body.strip() else ""
