"""What a reader of a page sees: HTML and Markdown reduced to the text a browser would show.

Documents are ingested as the text a person reads, never as their markup: a poisoned page can hide
instructions in comments, hidden elements or invisible styles that no reviewer sees but a model
would read. `html_to_text` keeps headings as `#` lines so chunking can follow them.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser


def html_to_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML document: only what a browser shows."""
    parser = _HTMLToText()
    parser.feed(html)
    parser.close()
    return " ".join(parser.title.split()), parser.text()


class _HTMLToText(HTMLParser):
    """HTML to markdown-ish text: headings become `#` lines so chunking can follow them.

    Only what a browser shows is kept: comments, `<script>`, `<style>`, `<template>`, `<noscript>`
    and the like, and every element hidden by the `hidden` attribute, `aria-hidden="true"`, an inline
    style (`display:none`, `visibility:hidden`, `opacity:0`, `font-size:0`, ...), a closed `<dialog>`
    or a common utility class (`hidden`, `d-none`, `sr-only`, ...) is dropped with everything inside
    it, since a poisoned page can hide instructions there that no reviewer sees. Open elements are
    tracked on a stack the way browsers close them (void elements, implied end tags of `p`, `li`,
    table cells, end tags outside their scope, stray end tags); where this parser and a browser
    could disagree, it hides more rather than less. It must be fed a whole document at once.
    """

    _SKIP = {"script", "style", "noscript", "template", "svg", "iframe", "noembed", "noframes", "datalist"}
    _BLOCK = {"p", "div", "section", "article", "main", "header", "footer", "nav", "aside", "ul", "ol",
              "table", "tr", "blockquote", "pre", "dl", "dt", "dd", "figure", "figcaption", "form", "hr"}
    _VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
             "track", "wbr", "keygen", "frame", "basefont", "bgsound"}
    # elements a browser keeps open however the document ends them: what follows stays inside
    _NEVER_CLOSED = {"html", "body"}
    # where an end tag stops looking for its element (the HTML "default scope"); table parts look
    # further, up to the table
    _SCOPE = {"applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "svg",
              "math", "button"}
    _TABLE_PARTS = {"tbody", "thead", "tfoot", "tr", "td", "th", "caption", "colgroup"}
    _FORMATTING = {"a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong",
                   "tt", "u"}
    # start tags that end an open <p> (HTML "closes a p element")
    _CLOSES_P = {"address", "article", "aside", "blockquote", "center", "details", "dialog", "dir", "div",
                 "dl", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
                 "h6", "header", "hgroup", "hr", "li", "dd", "dt", "listing", "main", "menu", "nav", "ol",
                 "p", "pre", "section", "summary", "table", "ul", "xmp", "plaintext"}
    # start tag -> the open elements it ends, and where that search stops
    _IMPLIED = {
        "li": ({"li"}, {"ul", "ol", "menu"}),
        "dt": ({"dt", "dd"}, {"dl"}),
        "dd": ({"dt", "dd"}, {"dl"}),
        "tr": ({"tr", "td", "th"}, {"table", "tbody", "thead", "tfoot"}),
        "td": ({"td", "th"}, {"tr", "table"}),
        "th": ({"td", "th"}, {"tr", "table"}),
        "tbody": ({"tbody", "thead", "tfoot", "tr", "td", "th"}, {"table"}),
        "thead": ({"tbody", "thead", "tfoot", "tr", "td", "th"}, {"table"}),
        "tfoot": ({"tbody", "thead", "tfoot", "tr", "td", "th"}, {"table"}),
        "option": ({"option"}, {"select", "datalist", "optgroup"}),
        "optgroup": ({"option", "optgroup"}, {"select"}),
    }
    _HIDDEN_CLASSES = {"hidden", "d-none", "invisible", "sr-only", "visually-hidden", "screen-reader-text"}
    # Tailwind's `hidden md:block`, Bootstrap's `d-none d-md-block`: shown on some screens
    _SHOWN_ON_SOME = re.compile(r":|^d-(?:sm|md|lg|xl|xxl)-(?!none)")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title = ""
        self._open: list[tuple[str, bool]] = []  # (tag, hides its content), outermost first
        self._hiding = 0  # how many open elements hide their content
        self._in_title = False

    # --- what hides -------------------------------------------------------------------------------
    def _hides(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in self._SKIP:
            return True
        names = {name for name, _ in attrs}
        if tag == "dialog" and "open" not in names:
            return True
        for name, value in attrs:
            value = (value or "").strip()
            if name == "hidden":  # any value, "until-found" too
                return True
            if name == "aria-hidden" and value.lower() == "true":
                return True
            if name == "style" and _hiding_style(value):
                return True
            if name == "class":
                classes = value.lower().split()
                if self._HIDDEN_CLASSES.intersection(classes) and not any(
                    self._SHOWN_ON_SOME.search(c) for c in classes
                ):
                    return True
        return False

    # --- the stack of open elements ----------------------------------------------------------------
    def _push(self, tag: str, hides: bool) -> None:
        self._open.append((tag, hides))
        self._hiding += hides

    def _pop_to(self, index: int) -> None:
        """Close the open element at `index` and everything opened inside it."""
        closed, self._open = self._open[index:], self._open[:index]
        self._hiding -= sum(hides for _, hides in closed)

    def _find(self, targets: set[str], stop: set[str]) -> int | None:
        """The innermost open element named in `targets`, unless an element in `stop` comes first."""
        for i in range(len(self._open) - 1, -1, -1):
            tag = self._open[i][0]
            if tag in targets:
                return i
            if tag in stop:
                return None
        return None

    def _foreign(self) -> bool:
        return any(tag in ("svg", "math") for tag, _ in self._open)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
            return
        if tag in ("head", "body", "html") and any(t == tag for t, _ in self._open):
            return  # a second <body> only adds attributes
        if tag == "head":
            return  # its children that show nothing are dropped on their own; stray text shows in browsers
        if tag in self._CLOSES_P:
            at = self._find({"p"}, self._SCOPE)
            if at is not None:
                self._pop_to(at)
        if tag in self._IMPLIED:
            targets, stop = self._IMPLIED[tag]
            at = self._find(targets, stop | self._SCOPE)
            if at is not None:
                self._pop_to(at)
        hides = self._hides(tag, attrs)
        if tag not in self._VOID:
            self._push(tag, hides)
        if self._hiding or hides:
            return
        if len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in ("br", "td", "th"):
            self.parts.append("\n" if tag == "br" else f" {_CELL} ")
        elif tag == "table":
            self.parts.append(f"\n\n{_TABLE}\n\n")
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # Browsers ignore the slash of `<div hidden/>` (what follows is inside it); only void elements
        # and SVG/MathML elements close themselves.
        foreign = self._foreign() or tag in ("svg", "math")
        self.handle_starttag(tag, attrs)
        if foreign and tag not in self._VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
            return
        if tag == "br":  # browsers read </br> as <br>
            self.handle_starttag("br", [])
            return
        if tag in self._NEVER_CLOSED or tag == "head":
            return
        if tag in self._FORMATTING:
            at = self._find({tag}, self._SCOPE)
            if at is not None:
                if any(t not in self._FORMATTING for t, _ in self._open[at + 1 :]):
                    # A block inside <b>…</b> stays open after </b> (the "adoption agency"): only the
                    # formatting element itself ends.
                    _, hides = self._open.pop(at)
                    self._hiding -= hides
                else:
                    self._pop_to(at)
            return
        stop = {"html", "table", "template"} if tag in self._TABLE_PARTS else self._SCOPE - {tag}
        at = self._find({tag}, stop)
        if at is not None:
            self._pop_to(at)
        heading = len(tag) == 2 and tag[0] == "h" and tag[1] in "123456"
        if not self._hiding and (heading or tag in self._BLOCK):
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._hiding:  # (a cell marker in the text itself is only a space)
            self.parts.append(re.sub(r"\s+", " ", data.replace(_CELL, " ").replace(_TABLE, " ")))

    def parse_comment(self, i: int, report: int = 1) -> int:
        """Comments end where browsers end them: at `-->` or `--!>` (`<!-->` is empty), else at the end
        of the document. (Python's parser also ends them at `-- >`, which would show hidden text.)"""
        rawdata = self.rawdata
        if rawdata.startswith(("<!-->", "<!--->"), i):
            return rawdata.index(">", i) + 1
        m = _COMMENT_END.search(rawdata, i + 4)
        return m.end() if m else len(rawdata)

    def text(self) -> str:
        lines = _html_tables([line.strip() for line in "".join(self.parts).splitlines()])
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# Private-use characters (never whitespace or a line break to Python, unlike the ASCII separators)
_CELL = "\ue000"  # where a table cell starts, until `_html_tables` reads the rows
_TABLE = "\ue001"  # where a table starts (two tables in a row are two tables)


def _html_tables(lines: list[str]) -> list[str]:
    """Table rows (lines with cells, blank lines between them) as a Markdown table, its first row the
    header, for `tables_as_lists`; a table of one row or one column is its cells' text."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if len(rows) > 1 and max(len(r) for r in rows) > 1:
            width = max(len(r) for r in rows)
            table = [r + [""] * (width - len(r)) for r in rows]
            out.append("")
            out.append("| " + " | ".join(table[0]) + " |")
            out.append("|" + " --- |" * width)
            out.extend("| " + " | ".join(r) + " |" for r in table[1:])
            out.append("")
        else:
            out.extend(" ".join(c for c in r if c) for r in rows)
        rows.clear()

    for line in lines:
        if line == _TABLE:
            flush()
        elif _CELL in line:
            cells = [c.strip().replace("|", "\\|") for c in line.split(_CELL)]
            rows.append(cells[1:] if not cells[0] else cells)
        elif not line and rows:
            continue  # the blank line between two rows
        else:
            if rows:
                flush()
            out.append(line)
    if rows:
        flush()
    return out


_COMMENT_END = re.compile(r"--!?>")
_CSS_COMMENT = re.compile(r"/\*.*?(?:\*/|\Z)", re.S)
_CSS_ESCAPE = re.compile(r"\\([0-9a-fA-F]{1,6})\s?|\\(.)", re.S)
_ZERO = re.compile(r"[+]?(?:0+\.?0*|\.0+)(?:[a-z]+|%)?")
_SMALL_PX = re.compile(r"[+]?(\d*\.?\d+)(px|pt)")


def _css_unescape(m: re.Match[str]) -> str:
    if m.group(1):
        cp = int(m.group(1), 16)
        return chr(cp) if 0 < cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF else "\ufffd"
    return m.group(2)


def _hiding_style(style: str) -> bool:
    """Whether an inline style hides the element: display:none, visibility:hidden or collapse,
    content-visibility:hidden, opacity under 0.1, a font size of zero (or under 2px), transparent
    text. Any one of them counts, even if a later declaration would override it."""
    css = _CSS_ESCAPE.sub(_css_unescape, _CSS_COMMENT.sub("", style)).lower()
    for declaration in css.split(";"):
        prop, _, value = declaration.partition(":")
        prop = prop.strip()
        value = re.sub(r"\s+", " ", value.replace("!important", "")).strip()
        if (prop, value) in {("display", "none"), ("visibility", "hidden"), ("visibility", "collapse"),
                             ("content-visibility", "hidden"), ("color", "transparent")}:
            return True
        if prop == "opacity":
            number = value[:-1] if value.endswith("%") else value
            try:
                if float(number) / (100 if value.endswith("%") else 1) < 0.1:
                    return True
            except ValueError:
                pass
        if prop == "font-size":
            small = _SMALL_PX.fullmatch(value)
            if _ZERO.fullmatch(value) or (small and float(small.group(1)) < 2):
                return True
    return False


_MD_COMMENT = re.compile(r"<!--(?:-?>|.*?(?:--!?>|\Z))", re.S)


def strip_markdown_comments(text: str) -> str:
    """Markdown without its HTML comments (renderers show none of them), except inside code fences."""
    blocks: list[list[str]] = [[]]  # prose and fenced code alternate, prose first
    for line in text.split("\n"):
        fence = line.lstrip().startswith(("```", "~~~"))
        if fence and len(blocks) % 2:  # a fence opens: the code block starts with it
            blocks.append([])
        blocks[-1].append(line)
        if fence and not len(blocks) % 2 and len(blocks[-1]) > 1:  # a fence closes the code block
            blocks.append([])
    parts = [_MD_COMMENT.sub("", "\n".join(b)) if i % 2 == 0 else "\n".join(b) for i, b in enumerate(blocks)]
    return "\n".join(parts).strip()


_TABLE_ROW = re.compile(r"^\s*\|.*\|\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$")


def _cells(row: str) -> list[str]:
    inner = row.strip()[1:-1]  # the row's outer pipes
    return [c.strip() for c in re.split(r"(?<!\\)\|", inner)]


def tables_as_lists(text: str) -> str:
    """Markdown tables as list items a customer can read in a chat message.

    A table's rows were sent as they are written ("| Bike | Per day | | --- | --- | | Metro 3 | $45 |",
    one line in Telegram, rule and all). Each row becomes one item that names its columns, in the
    header's words: "- Bike: Metro 3; Per day: $45; Per week: $180". Retrieval, the grounding check
    and the extract then read a row as the sentence it is. Lines of pipes with no header rule under
    their first line are not a table (Markdown's own rule) and stay as written.
    """
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if i + 1 < len(lines) and _TABLE_ROW.match(lines[i]) and _TABLE_RULE.match(lines[i + 1]):
            header = _cells(lines[i])
            i += 2
            while i < len(lines) and _TABLE_ROW.match(lines[i]):
                cells = _cells(lines[i])
                names = header + [""] * (len(cells) - len(header))  # a cell past the header keeps its text
                named = [f"{h}: {c}" if h else c for h, c in zip(names, cells, strict=False) if c]
                if named:
                    out.append("- " + "; ".join(named).replace("\\|", "|"))
                i += 1
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)
