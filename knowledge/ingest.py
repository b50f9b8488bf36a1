"""Documents in, chunks out: loading markdown, text, HTML and PDF files and writing their chunks.

Re-ingesting is idempotent by content hash: an unchanged file costs one hash and nothing else,
a changed file's chunks are replaced, and `prune=True` removes documents whose files are gone.
A file that cannot be read is reported by name with the reason and skipped; the rest go in.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from knowledge import embed, language, vectors
from knowledge.invisible import strip_invisible

log = logging.getLogger(__name__)

SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
            ".html": "html", ".htm": "html", ".pdf": "pdf"}
CHUNK_CHARS = 900
CHUNK_OVERLAP = 150
# Part of every content hash: changing how text is chunked re-ingests everything once.
CHUNKER_VERSION = f"3:{CHUNK_CHARS}:{CHUNK_OVERLAP}"

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+")


class UnreadableDocument(Exception):
    """A file that cannot be turned into text; the message says why and what to do."""


@dataclass(frozen=True)
class Document:
    """One loaded file: markdown-ish text (headings as `#` lines) and its title."""

    path: Path
    source: str
    title: str
    text: str


@dataclass(frozen=True)
class Chunk:
    """One piece of a document; `text` is what gets embedded and indexed (title first)."""

    id: str
    text: str
    title: str
    section: str
    index: int


@dataclass
class IngestReport:
    """What one ingest run did, by source name."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    chunks: int = 0  # chunks embedded and written in this run

    def summary(self) -> str:
        line = (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed, {len(self.skipped)} skipped; {self.chunks} chunks written"
        )
        return "\n".join([line, *(f"  skipped {path}: {reason}" for path, reason in self.skipped)])

    def __str__(self) -> str:
        return self.summary()


# --- loading -------------------------------------------------------------------------------------


def _title_from_name(path: Path) -> str:
    words = re.sub(r"[_\-]+", " ", path.stem).strip()
    return words[:1].upper() + words[1:] if words else path.name


def _decode(data: bytes, path: Path) -> str:
    if b"\x00" in data[:8192]:
        raise UnreadableDocument("binary content, not text; convert it to .md, .txt, .html or .pdf")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableDocument(f"not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from exc


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
            self.parts.append("\n" if tag == "br" else " ")
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
        elif not self._hiding:
            self.parts.append(re.sub(r"\s+", " ", data))

    def parse_comment(self, i: int, report: int = 1) -> int:
        """Comments end where browsers end them: at `-->` or `--!>` (`<!-->` is empty), else at the end
        of the document. (Python's parser also ends them at `-- >`, which would show hidden text.)"""
        rawdata = self.rawdata
        if rawdata.startswith(("<!-->", "<!--->"), i):
            return rawdata.index(">", i) + 1
        m = _COMMENT_END.search(rawdata, i + 4)
        return m.end() if m else len(rawdata)

    def text(self) -> str:
        lines = [line.strip() for line in "".join(self.parts).splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


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


def _load_pdf(path: Path) -> tuple[str, str]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise UnreadableDocument("encrypted PDF; save an unencrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title if reader.metadata else None) or ""
    except UnreadableDocument:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise UnreadableDocument(f"not a readable PDF ({exc}); export it again as PDF or as text") from exc
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise UnreadableDocument("the PDF has no extractable text (scanned?); run OCR or add a text version")
    return str(meta_title).strip(), text


_MD_COMMENT = re.compile(r"<!--(?:-?>|.*?(?:--!?>|\Z))", re.S)


def _strip_markdown_comments(text: str) -> str:
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


def _unsupported(path: Path) -> str:
    supported = ", ".join(sorted(SUFFIXES))
    return f"unsupported file type {path.suffix or '(none)'!r}; convert it to one of {supported}"


def load_document(path: Path, source: str) -> Document:
    """Read one supported file into a Document, or raise UnreadableDocument with the reason."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UnreadableDocument(_unsupported(path))
    title = ""
    if kind == "pdf":
        title, text = _load_pdf(path)
    else:
        try:
            raw = _decode(path.read_bytes(), path)
        except OSError as exc:
            raise UnreadableDocument(f"cannot read the file ({exc.strerror or exc})") from exc
        if kind == "html":
            parser = _HTMLToText()
            parser.feed(raw)
            parser.close()
            title, text = " ".join(parser.title.split()), parser.text()
        else:
            text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
            if kind == "markdown":
                text = _strip_markdown_comments(text)
    # invisible characters can carry instructions no reader of the document sees (knowledge/invisible.py)
    title, text = strip_invisible(title), strip_invisible(text)
    if kind in ("markdown", "html") and not title:
        first = text.split("\n", 1)[0]
        m = _HEADING.match(first)
        if m and len(m.group(1)) == 1:
            title = m.group(2).strip()
    if not text.strip():
        raise UnreadableDocument("the file holds no text")
    return Document(path=path, source=source, title=title or _title_from_name(path), text=text)


# --- chunking ------------------------------------------------------------------------------------


def _sections(doc: Document) -> list[tuple[str, str]]:
    """(heading trail, body) pairs, split on markdown headings (not inside code fences)."""
    out: list[tuple[str, str]] = []
    trail: list[tuple[int, str]] = []
    body: list[str] = []
    fenced = False

    def flush() -> None:
        text = "\n".join(body).strip()
        if text:
            names = [name for _, name in trail if name != doc.title]
            out.append((" > ".join(names), text))
        body.clear()

    for line in doc.text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else _HEADING.match(line)
        if m:
            flush()
            level = len(m.group(1))
            trail = [(lvl, name) for lvl, name in trail if lvl < level] + [(level, m.group(2).strip())]
        else:
            body.append(line)
    flush()
    return out


def _pieces(text: str, limit: int) -> list[str]:
    """Paragraphs, with over-long ones cut at sentence ends and, failing that, at spaces."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= limit:
            out.append(para)
            continue
        for sentence in _SENTENCE_END.split(para):
            while len(sentence) > limit:
                cut = sentence.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                out.append(sentence[:cut].strip())
                sentence = sentence[cut:].strip()
            if sentence:
                out.append(sentence)
    return out


def _tail(text: str, size: int) -> str:
    """The last `size`-ish characters of text, starting at a word boundary."""
    if len(text) <= size:
        return text
    cut = text.find(" ", len(text) - size)
    return text[cut + 1 :] if cut != -1 else text[-size:]


def split_text(text: str, limit: int = CHUNK_CHARS, overlap: int = CHUNK_OVERLAP) -> list[str]:
    """~`limit`-character chunks on paragraph/sentence boundaries, each repeating `overlap` of the last."""
    chunks: list[str] = []
    current = ""
    for piece in _pieces(text, limit - overlap):
        if current and len(current) + 2 + len(piece) > limit:
            chunks.append(current)
            current = _tail(current, overlap)
            current = f"{current} {piece}" if current else piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def chunk_document(doc: Document) -> list[Chunk]:
    """Heading-aware chunks; the title (and section trail) heads each chunk's embedded text.

    Each section is chunked on its own, so a chunk never mixes two topics. (Packing short
    neighbouring sections into one chunk was tried: it lost 3 of 35 demo questions at rank 1.)
    """
    key = hashlib.sha1(str(doc.path).encode()).hexdigest()[:16]
    chunks: list[Chunk] = []
    for section, body in _sections(doc):
        head = f"{doc.title}\n{section}" if section else doc.title
        for piece in split_text(body):
            chunks.append(Chunk(id=f"{key}:{len(chunks)}", text=f"{head}\n\n{piece}", title=doc.title,
                                section=section, index=len(chunks)))
    return chunks


# --- ingesting -----------------------------------------------------------------------------------


def discover(paths: Iterable[Path]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(file, source name) pairs under `paths`, and (path, reason) for paths that are not there.

    A directory's files are named relative to it; hidden files and folders are left out.
    """
    found: dict[Path, str] = {}
    missing: list[tuple[str, str]] = []
    for root in paths:
        root = Path(root).expanduser()
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.setdefault(f.resolve(), rel.as_posix())
        elif root.is_file():
            found.setdefault(root.resolve(), root.name)
        else:
            missing.append((str(root), "no such file or directory"))
    return list(found.items()), missing


def _content_hash(path: Path) -> str:
    h = hashlib.sha256(CHUNKER_VERSION.encode())
    h.update(path.read_bytes())
    return h.hexdigest()


def _stored_documents(col: Any) -> dict[str, tuple[str, str]]:
    """doc path -> (content hash, source) of everything in the collection."""
    docs: dict[str, tuple[str, str]] = {}
    for hit in vectors.get(col, with_text=False):
        m = hit.metadata
        docs.setdefault(str(m.get("doc", "")), (str(m.get("hash", "")), str(m.get("source", ""))))
    return docs


@dataclass(frozen=True)
class StoredDocument:
    """One ingested file, as `apprentice kb list` shows it."""

    path: str
    source: str
    title: str
    chunks: int


def stored(col: Any) -> list[StoredDocument]:
    """Every document in the collection, by source name."""
    found: dict[str, list[Any]] = {}
    for hit in vectors.get(col, with_text=False):
        found.setdefault(str(hit.metadata.get("doc", "")), []).append(hit.metadata)
    out = [
        StoredDocument(path=doc, source=str(metas[0].get("source", "")),
                       title=str(metas[0].get("title", "")), chunks=len(metas))
        for doc, metas in found.items()
    ]  # fmt: skip
    return sorted(out, key=lambda d: d.source)


def remove(col: Any, names: Sequence[str]) -> list[StoredDocument]:
    """Delete the documents whose source name or path is in `names`; returns what went.

    A folder name removes every document under it, so `kb rm old-manuals/` empties that folder.
    """
    wanted = [n.rstrip("/") for n in names if n.strip("/")]
    gone = []
    for doc in stored(col):
        if any(n in (doc.source, doc.path) or doc.source.startswith(n + "/") for n in wanted):
            vectors.delete(col, where={"doc": doc.path})
            gone.append(doc)
    return gone


def ingest(col: Any, paths: Sequence[Path], prune: bool = False, progress: bool = False) -> IngestReport:
    """Bring the collection in line with the files under `paths` (see module docstring)."""
    from tqdm import tqdm

    report = IngestReport()
    files, report.skipped = discover(paths)
    stored = _stored_documents(col)
    for path, source in tqdm(files, desc="ingest", unit="file", disable=not progress):
        key = str(path)
        if path.suffix.lower() not in SUFFIXES:  # before hashing: a KB folder may hold big media files
            report.skipped.append((str(path), _unsupported(path)))
            continue
        try:
            digest = _content_hash(path)
        except OSError as exc:
            report.skipped.append((str(path), f"cannot read the file ({exc.strerror or exc})"))
            continue
        old = stored.get(key)
        if old is not None and old[0] == digest:
            report.unchanged.append(source)
            continue
        try:
            doc = load_document(path, source)
        except UnreadableDocument as exc:
            log.warning("skipped %s: %s", path, exc)
            report.skipped.append((str(path), str(exc)))
            continue
        chunks = chunk_document(doc)
        embeddings = embed.embed([c.text for c in chunks])
        if old is not None:
            vectors.delete(col, where={"doc": key})
        lang = language.detect(doc.text)  # ISO 639-1; BM25 stems the chunks in this language
        metas = [
            {"doc": key, "source": source, "title": c.title, "section": c.section, "chunk": c.index,
             "hash": digest, "lang": lang}
            for c in chunks
        ]
        vectors.upsert(col, [c.id for c in chunks], [c.text for c in chunks], metas, embeddings)
        (report.updated if old is not None else report.added).append(source)
        report.chunks += len(chunks)
    if prune:
        for key, (_, source) in sorted(stored.items()):
            if not Path(key).exists():
                vectors.delete(col, where={"doc": key})
                report.removed.append(source)
    log.info("ingest: %s", report.summary().splitlines()[0])
    return report
