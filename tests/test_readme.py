"""The README is the manual: its configuration table must match the settings."""

from __future__ import annotations

from pathlib import Path

from knowledge.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- settings-table:start -->", "<!-- settings-table:end -->"
    current = text[text.index(start) + len(start) : text.index(end)].strip()
    assert current == settings_table(), (
        "README configuration table is stale; regenerate it with: "
        ".venv/bin/python -m knowledge.settings > /tmp/t && paste between the settings-table markers"
    )


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```") + 1 : lines.index("```", lines.index("```") + 1)]
    assert [line.split("#")[0].strip() for line in block] == ["make run", "make test"]
