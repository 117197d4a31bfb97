"""Text that did not come from the harness, made safe where the harness renders it.

Case names, kernels' exception messages, backend flavors and versions, known issues'
descriptions and links, and every field of another machine's results file are written by
someone else. ``report.md`` and ``attn-harness compare`` put them into markdown that GitHub
renders (job summaries included), and regression files put them into TOML comments. There a
``|`` would end a table cell, ``<script>`` or ``onerror=`` would be live HTML, a newline would
start a table row, a heading or (in a TOML comment) a ``[[case]]`` of its own, and a terminal
escape (ESC) would reach whoever reads the file in a terminal.

:func:`md` is the one function every such piece of text goes through on its way into markdown
(tables, prose and code spans); :func:`one_line` is what it and the TOML comments build on;
:func:`fence` wraps a block of such text as a fenced code block no line of it can close.
"""

from __future__ import annotations

import re
import unicodedata

#: Characters that end a line somewhere (Python's str.splitlines, TOML, markdown, terminals).
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")
#: Format characters that reorder or hide text (bidirectional overrides: "Trojan Source").
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Markdown characters escaped with a backslash: ``|`` ends a table cell, ``\\`` would escape
#: what follows, a backtick opens a code span, ``*`` emphasis, ``~`` strikethrough, ``[`` and
#: ``]`` links and images (``![x](http://tracker)``), ``#`` a heading where a text starts a
#: line; ``_`` too, except between two letters or digits (``head_dim``), where it cannot open
#: or close emphasis.
_MARKDOWN = re.compile(r"([\\|`*~\[\]#])|(?<![^\W_])_|_(?![^\W_])")
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _visible(ch: str) -> str:
    """A character no renderer may act on, as the escape that names it (``\\x1b``)."""
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: object) -> str:
    """``text`` on one line of printable characters: line breaks and tabs become spaces, other
    control characters (ESC, NUL, DEL, C1), bidirectional overrides and lone surrogates become
    the escape that names them (``\\x1b``, ``\\u202e``, ``\\ud800``)."""
    out = []
    for ch in str(text):
        if ch in _LINE_BREAKS or ch == "\t":
            out.append(" ")
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(_visible(ch))
        else:
            out.append(ch)
    return "".join(out)


def md(text: object, *, code: bool = False) -> str:
    """``text`` as markdown that renders as exactly that text, on one line, in a table cell or
    in prose: no HTML, link, emphasis or new row. With ``code``, as an inline code span (inside
    it nothing is markup, so only ``|`` needs its table escape and the backtick fence is made
    longer than any run of backticks in the text).

    Args:
        text: the text (anything: it is turned into a string first).
        code: render it as a code span (what the report uses for setups and backends).
    """
    text = one_line(text)
    if code and not text:
        return ""
    if code:
        longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
        ticks = "`" * (longest + 1)
        pad = " " if text.startswith(("`", " ")) or text.endswith(("`", " ")) else ""
        return f"{ticks}{pad}{text.replace('|', chr(92) + '|')}{pad}{ticks}"
    text = "".join(_HTML.get(ch, ch) for ch in text)
    return _MARKDOWN.sub(lambda m: "\\" + m.group(0), text)


def fence(text: str, info: str = "") -> str:
    """``text`` (several lines) as a fenced code block that none of its lines can close: the
    fence is longer than any run of backticks in it. Each line goes through :func:`one_line`."""
    lines = [one_line(line) for line in str(text).split("\n")]
    body = "\n".join(lines).rstrip("\n")
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{info}\n{body}\n{ticks}"
