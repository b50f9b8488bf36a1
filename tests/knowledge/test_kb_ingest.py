"""Ingestion: four file formats, heading-aware chunks, idempotent re-ingest, bad files skipped by name."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from knowledge.ingest import CHUNK_CHARS, CHUNK_OVERLAP, Document, chunk_document, load_document, split_text
from knowledge.retrieve import KnowledgeBase


def write_pdf(path: Path, lines: list[str], title: str = "") -> None:
    """A minimal valid one-page PDF with Helvetica text, written by hand (correct xref offsets)."""

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    content = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({esc(line)}) Tj T*" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        "/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
    ]
    if title:
        objects.append(f"<< /Title ({esc(title)}) >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    info = f" /Info {len(objects)} 0 R" if title else ""
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))


MARKDOWN = """# Winter storage

Store the bike indoors between November and March, away from radiators.

## Battery care

Keep the e-bike battery at 60 percent charge and recharge it every 8 weeks during storage.

## Tyres

Hang the bike or pump the tyres to 2 bar every month so they do not get flat spots.
"""

HTML = """<!doctype html><html><head><title>Helmet sizing</title>
<style>body { color: zebracolour; }</style><script>var trackingPixel = "xyzzytracker";</script></head>
<body><h1>Helmet sizing</h1><p>Measure your head 2&nbsp;cm above the eyebrows.</p>
<h2>Sizes</h2><ul><li>S: 51 to 55 cm</li><li>M: 55 to 59 cm</li><li>L: 59 to 63 cm</li></ul></body></html>
"""


@pytest.fixture
def formats(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "winter-storage.md").write_text(MARKDOWN, encoding="utf-8")
    (folder / "loyalty_points.txt").write_text(
        "Every dollar spent earns 3 loyalty points. 500 points give a $25 voucher.\n", encoding="utf-8"
    )
    (folder / "helmets.html").write_text(HTML, encoding="utf-8")
    write_pdf(
        folder / "lights.pdf",
        ["Front lights must be switched on from sunset to sunrise.", "A red rear reflector is required."],
        title="Lighting rules",
    )
    return folder


def test_each_format_is_loaded_with_its_title(formats: Path) -> None:
    md = load_document(formats / "winter-storage.md", "winter-storage.md")
    assert md.title == "Winter storage"
    txt = load_document(formats / "loyalty_points.txt", "loyalty_points.txt")
    assert txt.title == "Loyalty points" and "3 loyalty points" in txt.text
    html = load_document(formats / "helmets.html", "helmets.html")
    assert html.title == "Helmet sizing"
    assert "2 cm above the eyebrows" in html.text.replace("\xa0", " ")
    assert "## Sizes" in html.text and "- M: 55 to 59 cm" in html.text
    assert "xyzzytracker" not in html.text and "zebracolour" not in html.text
    pdf = load_document(formats / "lights.pdf", "lights.pdf")
    assert pdf.title == "Lighting rules"
    assert "switched on from sunset to sunrise" in pdf.text and "red rear reflector" in pdf.text


TABLE_MD = """# Rentals

Both stores rent bikes by the day.

| Bike | Per day | Per week |
|:-----|--------:|---------:|
| Metro 3 | $45 | $180 |
| Tempo \\| Road | $65 | |
| Ridgeline | $75 | $300 | helmet included |

| not | a table: no rule under its first row |
"""

TABLE_HTML = """<html><body><h1>Rentals</h1><p>Both stores rent bikes by the day.</p>
<table><thead><tr><th>Bike<th>Per day<th>Per week</thead>
<tbody><tr><td>Metro 3<td>$45<td>$180<tr><td>Tempo | Road<td>$65<td></tbody></table>
<table><tr><td>A one-row layout table</td><td>stays text</td></tr></table></body></html>"""


def test_a_table_becomes_one_list_item_a_row_naming_its_columns(tmp_path: Path) -> None:
    """A chat shows no tables: Telegram put "| Bike | Per day | | --- |" on one line."""
    (tmp_path / "rentals.md").write_text(TABLE_MD, encoding="utf-8")
    (tmp_path / "rentals.html").write_text(TABLE_HTML, encoding="utf-8")
    for name in ("rentals.md", "rentals.html"):
        text = load_document(tmp_path / name, name).text
        assert "- Bike: Metro 3; Per day: $45; Per week: $180" in text, name
        assert "- Bike: Tempo | Road; Per day: $65\n" in text + "\n", name  # an empty cell is left out
        assert "---" not in text and "Both stores rent bikes by the day." in text
    # a cell past the header's columns keeps its text
    text = load_document(tmp_path / "rentals.md", "r").text
    assert "- Bike: Ridgeline; Per day: $75; Per week: $300; helmet included" in text
    no_rule = "| not | a table: no rule under its first row |"
    assert no_rule in load_document(tmp_path / "rentals.md", "r").text
    assert "A one-row layout table stays text" in load_document(tmp_path / "rentals.html", "r").text


def test_markdown_is_chunked_by_heading_with_the_title_in_front() -> None:
    doc = Document(path=Path("/kb/winter.md"), source="winter.md", title="Winter storage", text=MARKDOWN)
    chunks = chunk_document(doc)
    assert [c.section for c in chunks] == ["", "Battery care", "Tyres"]
    assert chunks[1].text.startswith("Winter storage\nBattery care\n\n")
    assert "60 percent" in chunks[1].text and "flat spots" not in chunks[1].text
    assert all(c.text.startswith("Winter storage") for c in chunks)
    assert len({c.id for c in chunks}) == 3


def test_long_text_is_split_into_overlapping_chunks_of_bounded_size() -> None:
    sentences = [f"Sentence number {i} says the shop sold {i * 7} bikes that week." for i in range(80)]
    text = " ".join(sentences[:40]) + "\n\n" + " ".join(sentences[40:])
    chunks = split_text(text)
    assert len(chunks) >= 5
    assert all(len(c) <= CHUNK_CHARS for c in chunks)
    for prev, nxt in itertools.pairwise(chunks):
        assert prev[-40:] in nxt[: CHUNK_OVERLAP + 40]  # each chunk repeats the end of the previous one
    joined = " ".join(chunks)
    assert all(s in joined for s in sentences)  # nothing is lost


def test_all_formats_are_ingested_and_searchable(tmp_path: Path, formats: Path) -> None:
    kb = KnowledgeBase(tmp_path / "data")
    try:
        report = kb.ingest([formats])
        expected = ["helmets.html", "lights.pdf", "loyalty_points.txt", "winter-storage.md"]
        assert sorted(report.added) == expected
        assert report.skipped == [] and report.chunks == kb.count() >= 4
        expectations = {
            "How often should I recharge the battery when the bike is stored?": "winter-storage.md",
            "How many loyalty points do I get per dollar?": "loyalty_points.txt",
            "What helmet size for a 57 cm head?": "helmets.html",
            "When do I need to turn my front light on?": "lights.pdf",
        }
        for question, source in expectations.items():
            assert kb.search(question, 1)[0].source == source, question
    finally:
        kb.close()


def test_reingest_costs_nothing_when_unchanged_replaces_changed_and_prunes_deleted(
    tmp_path: Path, formats: Path, chroma_url: str
) -> None:
    kb = KnowledgeBase(tmp_path / "data", chroma_url)
    try:
        kb.ingest([formats])
        total = kb.count()

        again = kb.ingest([formats])
        assert again.chunks == 0 and again.added == again.updated == []
        assert len(again.unchanged) == 4 and kb.count() == total

        (formats / "loyalty_points.txt").write_text(
            "Loyalty points were discontinued on 1 March; issued vouchers stay valid.\n", encoding="utf-8"
        )
        changed = kb.ingest([formats])
        assert changed.updated == ["loyalty_points.txt"] and len(changed.unchanged) == 3
        assert kb.count() == total  # one chunk replaced by one chunk, none left behind
        hit = kb.search("loyalty points voucher", 1)[0]
        assert hit.source == "loyalty_points.txt" and "discontinued" in hit.text
        assert not any("3 loyalty points" in p.text for p in kb.search("loyalty points per dollar", 4))

        (formats / "helmets.html").unlink()
        kept = kb.ingest([formats])  # without prune the document stays
        assert kept.removed == [] and kb.count() == total
        pruned = kb.ingest([formats], prune=True)
        assert pruned.removed == ["helmets.html"]
        assert kb.count() == total - 2  # the HTML page had two sections, so two chunks
        assert all(p.source != "helmets.html" for p in kb.search("helmet sizes", 4))
    finally:
        kb.close()


def test_unreadable_files_are_reported_by_name_and_the_rest_ingested(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\n\nThe workshop fixes punctures in 30 min.\n", encoding="utf-8")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (folder / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "latin1.md").write_bytes("# Caf\xe9\n\nCr\xe8me br\xfbl\xe9e.\n".encode("latin-1"))
    (folder / "empty.md").write_text("   \n", encoding="utf-8")
    (folder / "slides.pptx").write_bytes(b"PK\x03\x04")
    (folder / ".hidden.md").write_text("# Hidden\n\nnot ingested\n", encoding="utf-8")
    missing = tmp_path / "nowhere"

    kb = KnowledgeBase(tmp_path / "data")
    try:
        report = kb.ingest([folder, missing])
    finally:
        kb.close()
    assert report.added == ["good.md"]
    reasons = {Path(p).name: reason for p, reason in report.skipped}
    assert set(reasons) == {"broken.pdf", "binary.txt", "latin1.md", "empty.md", "slides.pptx", "nowhere"}
    assert "PDF" in reasons["broken.pdf"]
    assert "binary" in reasons["binary.txt"]
    assert "UTF-8" in reasons["latin1.md"]
    assert "no text" in reasons["empty.md"]
    assert "unsupported" in reasons["slides.pptx"] and ".md" in reasons["slides.pptx"]
    assert "no such file" in reasons["nowhere"]
    assert "broken.pdf" in report.summary()


def test_kb_list_shows_each_document_and_kb_rm_removes_it_from_search(
    tmp_path: Path, formats: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    monkeypatch.setenv("APPRENTICE_DATA_DIR", str(tmp_path / "data"))
    assert main(["kb", "ingest", str(formats)]) == 0
    capsys.readouterr()
    assert main(["kb", "list"]) == 0
    listed = capsys.readouterr().out
    for name in ["helmets.html", "lights.pdf", "loyalty_points.txt", "winter-storage.md"]:
        assert name in listed
    assert "2 chunks  helmets.html" in listed

    assert main(["kb", "rm", "helmets.html"]) == 0
    assert "removed helmets.html (2 chunks)" in capsys.readouterr().out
    assert main(["kb", "rm", "no-such.md"]) == 1
    assert "kb list" in capsys.readouterr().err
    kb = KnowledgeBase(tmp_path / "data")
    try:
        assert [d.source for d in kb.documents()] == ["lights.pdf", "loyalty_points.txt", "winter-storage.md"]
        assert all(p.source != "helmets.html" for p in kb.search("helmet sizes", 4))
    finally:
        kb.close()
