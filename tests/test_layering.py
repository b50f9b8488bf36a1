"""Imports flow bench -> bot -> learning -> knowledge, and each outside SDK enters through one module.

`bench` (the benchmarks) stands above every floor: it may import all of them, and none of them imports
it, except the command line, which starts a benchmark from inside its command function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "bot", "knowledge", "learning")
FORBIDDEN = {
    "knowledge": {"learning", "bot", "bench"},
    "learning": {"bot", "bench"},
    "bot": {"bench"},
    "bench": set(),
}
# module -> packages it may import only inside a function: `apprentice bench ...` runs a benchmark
# from its command function, and `apprentice --help` never loads one
LAZY_ONLY = {"bot/cli.py": {"bench"}}
# SDK -> the modules allowed to import it
SDK_HOMES = {
    "chromadb": {"knowledge/vectors.py"},
    "sentence_transformers": {"knowledge/embed.py"},
    "lingua": {"knowledge/language.py"},
    "Stemmer": {"knowledge/language.py"},
    "wordfreq": {"knowledge/language.py"},
    "telegram": {"bot/channels/telegram/channel.py", "bot/channels/telegram/sender.py"},
    "slack_bolt": {"bot/channels/slack/app.py"},
    "slack_sdk": {"bot/channels/slack/app.py", "bot/channels/slack/web.py"},
    "trl": {"learning/train.py"},
    "apscheduler": {"learning/nightly.py"},
    "onnxruntime_genai": {"learning/onnx_engine.py"},
    "prometheus_client": {"bot/metrics.py"},
    "stdnum": {"learning/pii.py"},
    "phonenumbers": {"learning/pii.py"},
}


def _imports(path: Path, in_functions: bool = True) -> set[str]:
    """Top-level names the module imports; with in_functions False, only those outside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    nodes: list[ast.AST] = [tree]
    while nodes:
        node = nodes.pop()
        if not in_functions and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        nodes.extend(ast.iter_child_nodes(node))
    return names


def _modules(root: Path = ROOT) -> list[Path]:
    return [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]


def _layer_violations(root: Path) -> list[str]:
    bad = []
    for path in _modules(root):
        rel = path.relative_to(root).as_posix()
        lazy = LAZY_ONLY.get(rel, set())
        for name in sorted(_imports(path) & (FORBIDDEN[rel.split("/")[0]] - lazy)):
            bad.append(f"{rel} imports {name}")
        for name in sorted(_imports(path, in_functions=False) & lazy):
            bad.append(f"{rel} imports {name} outside a function")
    return bad


def test_layers_import_one_way() -> None:
    bad = _layer_violations(ROOT)
    assert not bad, bad


def test_no_floor_may_import_the_benchmarks(tmp_path: Path) -> None:
    """The rule catches a floor that reaches up into `bench`, and lets `bench` reach every floor."""
    files = {
        "bench/speed.py": "from bot.conversation import Inbound\nimport learning.runtime\nimport knowledge\n",
        "learning/answer.py": "from bench.common import percentiles\n",
        "knowledge/store.py": "def later():\n    import bench.retrieval\n",
        "bot/app.py": "def run():\n    from bench import cards\n",
        "bot/cli.py": "import bench.loop\n\ndef cmd():\n    from bench.loop import run_loop_bench\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert sorted(_layer_violations(tmp_path)) == [
        "bot/app.py imports bench",
        "bot/cli.py imports bench outside a function",
        "knowledge/store.py imports bench",
        "learning/answer.py imports bench",
    ]
    (tmp_path / "bot" / "cli.py").write_text(files["bot/cli.py"].split("\n\n", 1)[1], encoding="utf-8")
    assert "bot/cli.py imports bench outside a function" not in _layer_violations(tmp_path)


def test_every_layer_is_installed_and_type_checked() -> None:
    """A package the layers name but the wheel leaves out would fail only once installed."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == sorted(f"{pkg}*" for pkg in PACKAGES)
    assert sorted(config["tool"]["mypy"]["packages"]) == sorted(PACKAGES)


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
