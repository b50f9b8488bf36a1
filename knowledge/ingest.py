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
from pathlib import Path
from typing import Any

from knowledge import embed, language, vectors
from knowledge.invisible import strip_invisible
from knowledge.markup import html_to_text, strip_markdown_comments, tables_as_lists

log = logging.getLogger(__name__)

SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".txt": "text", ".text": "text",
            ".html": "html", ".htm": "html", ".pdf": "pdf"}
CHUNK_CHARS = 900
CHUNK_OVERLAP = 150
# Part of every content hash: changing how text is chunked re-ingests everything once.
CHUNKER_VERSION = f"4:{CHUNK_CHARS}:{CHUNK_OVERLAP}"

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
            title, text = html_to_text(raw)
        else:
            text = raw.replace("\r\n", "\n").replace("\r", "\n").strip()
            if kind == "markdown":
                text = strip_markdown_comments(text)
        if kind in ("markdown", "html"):
            text = tables_as_lists(text)  # a row a list item: a chat shows no tables
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
