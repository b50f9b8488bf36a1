"""Imports flow bot -> learning -> knowledge, and each outside SDK enters through one module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bot", "knowledge", "learning")
FORBIDDEN = {"knowledge": {"learning", "bot"}, "learning": {"bot"}, "bot": set()}
# SDK -> the modules allowed to import it
SDK_HOMES = {
    "chromadb": {"knowledge/vectors.py"},
    "sentence_transformers": {"knowledge/embed.py"},
    "lingua": {"knowledge/language.py"},
    "Stemmer": {"knowledge/language.py"},
    "telegram": {"bot/channels/telegram.py"},
    "slack_bolt": {"bot/channels/slack.py"},
    "slack_sdk": {"bot/channels/slack.py"},
    "trl": {"learning/train.py"},
    "apscheduler": {"learning/nightly.py"},
    "onnxruntime_genai": {"learning/onnx_engine.py"},
    "prometheus_client": {"bot/metrics.py"},
    "stdnum": {"learning/pii.py"},
    "phonenumbers": {"learning/pii.py"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def test_layers_import_one_way() -> None:
    bad = []
    for path in _modules():
        pkg = path.relative_to(ROOT).parts[0]
        for name in _imports(path) & FORBIDDEN[pkg]:
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_each_sdk_has_one_home() -> None:
    bad = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for sdk, homes in SDK_HOMES.items():
            if sdk in _imports(path) and rel not in homes:
                bad.append(f"{rel} imports {sdk} (allowed only in {sorted(homes)})")
    assert not bad, bad


def test_cli_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from bot import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft', 'chromadb', 'sentence_transformers',"
        " 'telegram', 'slack_bolt', 'onnxruntime_genai') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported at --help: {out.stdout}"
