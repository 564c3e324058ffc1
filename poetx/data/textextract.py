"""Plain text out of documentation formats: HTML/XML, Texinfo ``info``, Perl POD, dictd files.

Each function takes the decoded file content and returns its readable text, paragraphs
separated by blank lines. :func:`drop_repeated_lines` then removes the lines a set of pages
shares (navigation bars, footers), which no per-page rule can tell from content.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Sequence
from html.parser import HTMLParser

# Elements whose whole content is not prose (or not visible).
_SKIP_TAGS = frozenset({"script", "style", "head", "nav", "footer", "noscript", "svg", "math",
                        "template", "button", "select", "form", "textarea"})
# Elements that start a new line (the rest are inline).
_BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt",
    "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main",
    "ol", "p", "pre", "section", "table", "tbody", "td", "th", "thead", "tr", "ul",
    # DocBook and Mallard (GNOME help) block elements
    "para", "title", "listitem", "entry", "row", "simpara", "note", "tip", "warning", "item",
    "screen", "programlisting", "code", "synopsis", "term", "example", "page", "info",
})
_VOID_TAGS = frozenset({"br", "hr", "img", "input", "meta", "link", "area", "base", "col",
                        "embed", "param", "source", "track", "wbr"})
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_BLANK_LINES = re.compile(r"\n\s*\n(\s*\n)+")


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            if tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        if tag == "pre" or tag == "programlisting" or tag == "screen":
            self.pre_depth += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n" if tag in ("p", "para", "h1", "h2", "h3", "h4") else "\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if tag in ("pre", "programlisting", "screen"):
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        if self.pre_depth:
            self.parts.append(data)
        else:
            self.parts.append(_SPACES.sub(" ", data.replace("\n", " ")))


def tidy(text: str) -> str:
    """Strip each line's trailing spaces and keep at most one blank line between paragraphs."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(line if line.strip() else "" for line in lines)
    return _BLANK_LINES.sub("\n\n", text).strip("\n") + "\n" if text.strip() else ""


def markup_to_text(source: str) -> str:
    """Visible text of an HTML/XHTML/XML page; scripts, styles, head and navigation dropped."""
    parser = _TextParser()
    parser.feed(source)
    parser.close()
    text = "".join(parser.parts)
    return tidy("\n".join(line.strip() if not line.startswith("    ") else line
                          for line in text.split("\n")))


_INFO_HEADER = re.compile(r"^File: .*?Node: .*$", re.MULTILINE)


def info_to_text(source: str) -> str:
    """Text of a Texinfo ``info`` file: node headers, menus' markers and the tag table dropped."""
    tag_table = source.find("\x1f\nTag Table:")
    if tag_table >= 0:
        source = source[:tag_table]
    source = source.replace("\x1f", "").replace("\x7f", "")
    source = _INFO_HEADER.sub("", source)
    source = re.sub(r"^\* Menu:$", "", source, flags=re.MULTILINE)
    return tidy(source)


_POD_FORMAT = re.compile(r"[BCEFILSXZ]<(?:<+\s(.*?)\s>+|([^<>]*))>", re.DOTALL)
_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_inline(match: re.Match[str]) -> str:
    letter = match.group(0)[0]
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    if letter == "X" or letter == "Z":
        return ""
    if letter == "E":
        return _POD_ESCAPES.get(inner, html.unescape(f"&{inner};"))
    if letter == "L":
        return inner.split("|", 1)[0] if "|" in inner else inner
    return inner


def pod_to_text(source: str) -> str:
    """Text of Perl POD: directives become their argument (headings, items), codes unwrapped."""
    lines = []
    for line in source.split("\n"):
        if line.startswith("="):
            directive, _, rest = line.partition(" ")
            if directive in ("=head1", "=head2", "=head3", "=head4", "=item"):
                lines.append(rest)
            continue
        lines.append(line)
    text = "\n".join(lines)
    for _ in range(3):  # codes nest (B<C<...>>)
        text = _POD_FORMAT.sub(_pod_inline, text)
    return tidy(text)


def split_paragraph_chunks(text: str, target_chars: int) -> list[str]:
    """Cut a long text into pieces of about ``target_chars``: at a blank line once a piece has
    ``target_chars``, at any line break once it has twice that (texts without paragraphs)."""
    if len(text) <= target_chars:
        return [text] if text.strip() else []
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.split("\n"):
        if size >= 2 * target_chars or (size >= target_chars and not line.strip()):
            chunks.append(tidy("\n".join(current)))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    chunks.append(tidy("\n".join(current)))
    return [chunk for chunk in chunks if chunk]


def drop_repeated_lines(docs: Sequence[str], min_docs: int = 8, fraction: float = 0.01,
                        max_len: int = 200) -> list[str]:
    """Remove from every document the non-blank lines of at most ``max_len`` characters that
    occur in more than ``max(min_docs, fraction * len(docs))`` of the documents.

    Pages of one manual share headers, navigation and footers line for line; real prose repeats
    a whole line in that many pages only when it is a stock phrase, and losing those costs
    little. Lines are compared stripped; blank lines are kept.
    """
    counts: Counter[str] = Counter()
    for doc in docs:
        counts.update({line.strip() for line in doc.split("\n")
                       if line.strip() and len(line) <= max_len})
    limit = max(min_docs, fraction * len(docs))
    common = {line for line, n in counts.items() if n > limit}
    if not common:
        return list(docs)
    return [tidy("\n".join(line for line in doc.split("\n") if line.strip() not in common))
            for doc in docs]


def letter_fraction(text: str) -> float:
    """Fraction of the non-space characters that are letters (tables of numbers score low)."""
    non_space = len(text) - sum(text.count(c) for c in " \n\t")
    if non_space <= 0:
        return 0.0
    return sum(map(str.isalpha, text)) / non_space
