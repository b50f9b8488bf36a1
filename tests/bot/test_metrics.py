"""/metrics through prometheus_client: real activity is counted, and ops/ asks only for what is exposed.

The alert rules (ops/prometheus-alerts.yml) and the Grafana dashboard (ops/grafana/) are checked
against the metric families a running App actually serves, so a renamed metric breaks a test here
instead of silently emptying a panel or disarming an alert.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fakes.openai_api import FakeOpenAIServer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import App
from bot.envelope import Inbound
from bot.metrics import METRICS, operations_registry
from knowledge.models import TrainingRun
from knowledge.settings import Settings
from knowledge.store import Store

OPS = Path(__file__).resolve().parents[2] / "ops"
ALERTS = OPS / "prometheus-alerts.yml"
DASHBOARD = OPS / "grafana" / "apprentice-dashboard.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer("shop-model") as fake:
        yield fake


def metrics_settings(tmp_path: Path, llm_url: str, **overrides: Any) -> Settings:
    kb = tmp_path / "kb"
    kb.mkdir(exist_ok=True)
    (kb / "returns.md").write_text("# Returns\n\nBikes can be returned within 30 days.\n", encoding="utf-8")
    options: dict[str, Any] = dict(
        _env_file=None, data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ops.db'}",
        kb=str(kb), llm_url=llm_url, model="shop-model", http_port=0, relevance_threshold=-1.0,
        overlap_threshold=0.0,
        rate_limit_per_minute=0,
    )
    return Settings(**{**options, **overrides})


async def scrape(app: App) -> tuple[str, str]:
    """GET /metrics: (content type, body)."""
    url = f"http://127.0.0.1:{app.http.port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# names a family makes queryable, also before it has any sample (a labelled counter nobody used yet)
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def exposed_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


# --- counted after real activity -------------------------------------------------------------------


async def test_metrics_count_what_happened(tmp_path: Path, model_server: FakeOpenAIServer) -> None:
    before_corrections = METRICS.sample("apprentice_corrections_total")
    before_answers = METRICS.sample("apprentice_answer_latency_seconds_count", status="ok")
    async with App(metrics_settings(tmp_path, model_server.base_url)) as app:
        await app.start_http()
        question = Inbound("ops", "1", "c1", "Can I return my bike?", external_id="a")
        [first] = await app.service.handle(question)
        await app.service.handle(Inbound("ops", "1", "c1", "", external_id="b"))  # a notice, no model call
        assert first.message_id is not None
        assert await app.service.customer_feedback(first.message_id, "c1", up=False)
        await app.service.correct(first.message_id, "Yes, within 30 days with the receipt.", staff="U1")
        app.store.enqueue("telegram", "send", {"chat_id": "1", "text": "queued"})
        with app.store.session() as s:
            s.add(TrainingRun(status="rejected"))
            s.add(TrainingRun(status="promoted"))
        (tmp_path / "v3").mkdir()
        (tmp_path / "v3" / "adapter_config.json").write_text("{}")
        app.generator.set_adapter(str(tmp_path / "v3"), "v3")  # what this replica now answers with
        await app.generator.sync_adapter()  # type: ignore[attr-defined]  # loaded by the model server now
        app.generator.set_adapter(str(tmp_path / "missing"), "v4")  # the server finds no adapter there
        await app.generator.sync_adapter()  # type: ignore[attr-defined]
        content_type, text = await scrape(app)
    assert content_type == CONTENT_TYPE_LATEST
    got = samples(text)
    assert got[("apprentice_messages_in_total", (("channel", "ops"),))] == 2
    assert got[("apprentice_messages_out_total", (("channel", "ops"), ("kind", "answer")))] == 1
    assert got[("apprentice_messages_out_total", (("channel", "ops"), ("kind", "notice")))] == 1
    assert got[("apprentice_feedback_total", (("kind", "down"),))] >= 1
    assert got[("apprentice_corrections_total", ())] == before_corrections + 1
    assert got[("apprentice_answer_latency_seconds_count", (("status", "ok"),))] == before_answers + 1
    inf_bucket = ("apprentice_answer_latency_seconds_bucket", (("le", "+Inf"), ("status", "ok")))
    assert got[inf_bucket] == before_answers + 1
    assert got[("apprentice_retrieval_latency_seconds_count", ())] >= 1
    # read from the database when scraped
    assert got[("apprentice_outbox_depth", (("channel", "telegram"),))] == 1
    assert got[("apprentice_training_runs", (("status", "promoted"),))] == 1
    assert got[("apprentice_training_runs", (("status", "rejected"),))] == 1
    assert got[("apprentice_training_runs", (("status", "failed"),))] == 0  # present before the first failure
    assert got[("apprentice_stored_corrections", (("status", "active"),))] == 1
    assert got[("apprentice_stored_corrections", (("status", "pending"),))] == 0
    # read from the model runtime when scraped
    assert got[("apprentice_model_requests_total", (("outcome", "ok"),))] == 1
    assert got[("apprentice_model_requests_total", (("outcome", "busy"),))] == 0
    assert got[("apprentice_adapter_switches_total", ())] == 1
    assert got[("apprentice_adapter_errors_total", ())] == 1
    assert got[("apprentice_active_adapter_info", (("version", "v3"),))] == 1  # the failed v4 did not count
    assert ("apprentice_active_adapter_info", (("version", "v4"),)) not in got
    assert got[("apprentice_model_queue_depth", ())] == 0
    assert got[("apprentice_model_queue_capacity", ())] == app.settings.max_queue


async def test_a_full_model_queue_shows_in_depth_and_busy_requests(
    tmp_path: Path, model_server: FakeOpenAIServer
) -> None:
    before_busy = METRICS.sample("apprentice_answer_latency_seconds_count", status="busy")
    async with App(metrics_settings(tmp_path, model_server.base_url, max_queue=1)) as app:
        await app.start_http()
        model_server.hold()
        first = asyncio.create_task(app.service.handle(Inbound("ops", "1", "c1", "Can I return my bike?")))
        await model_server.wait_waiting(1)  # the one request the queue holds is at the model
        held = samples((await scrape(app))[1])
        await app.service.handle(Inbound("ops", "2", "c2", "And my helmet?"))  # no room: told to wait
        full = samples((await scrape(app))[1])
        model_server.release()
        await first
        after = samples((await scrape(app))[1])
    assert held[("apprentice_model_queue_depth", ())] == 1
    assert held[("apprentice_model_queue_capacity", ())] == 1
    assert held[("apprentice_model_requests_total", (("outcome", "ok"),))] == 0
    assert full[("apprentice_model_requests_total", (("outcome", "busy"),))] == 1
    assert full[("apprentice_answer_latency_seconds_count", (("status", "busy"),))] == before_busy + 1
    assert after[("apprentice_model_queue_depth", ())] == 0
    assert after[("apprentice_model_requests_total", (("outcome", "ok"),))] == 1


async def test_two_apps_in_one_process_serve_their_own_database_numbers(
    tmp_path: Path, model_server: FakeOpenAIServer
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        App(metrics_settings(tmp_path / "a", model_server.base_url), ingest=False) as a,
        App(metrics_settings(tmp_path / "b", model_server.base_url), ingest=False) as b,
    ):
        await a.start_http()
        await b.start_http()
        a.store.enqueue("telegram", "send", {"chat_id": "1", "text": "queued"})
        a.store.enqueue("telegram", "send", {"chat_id": "2", "text": "queued"})
        b.store.enqueue("slack", "post", {"channel": "C1", "text": "card"})
        got_a, got_b = samples((await scrape(a))[1]), samples((await scrape(b))[1])
    assert got_a[("apprentice_outbox_depth", (("channel", "telegram"),))] == 2
    assert ("apprentice_outbox_depth", (("channel", "slack"),)) not in got_a
    assert got_b[("apprentice_outbox_depth", (("channel", "slack"),))] == 1
    assert ("apprentice_outbox_depth", (("channel", "telegram"),)) not in got_b
    # the process counters are shared: both pages show the same value
    key = ("apprentice_corrections_total", ())
    assert got_a[key] == got_b[key] == METRICS.sample("apprentice_corrections_total")


def test_a_database_that_cannot_be_read_leaves_the_rest_of_the_page() -> None:
    class BrokenStore:
        def down(self) -> Any:
            raise ConnectionError("database down")

        outbox_depths = training_runs_by_status = corrections_by_status = down

    class Runtime:
        adapter_version, queue_depth, max_queue = None, 3, 8

    registry = operations_registry(BrokenStore(), Runtime())  # type: ignore[arg-type]
    got = samples(generate_latest(registry).decode())
    assert not [key for key in got if key[0] in ("apprentice_outbox_depth", "apprentice_training_runs")]
    assert got[("apprentice_model_queue_depth", ())] == 3
    assert got[("apprentice_active_adapter_info", (("version", "base"),))] == 1
    assert got[("apprentice_corrections_total", ())] == METRICS.sample("apprentice_corrections_total")


def test_the_outbox_gauge_and_the_store_count_the_same_items(tmp_path: Path) -> None:
    """One query counts the outbox: per channel for /metrics, summed for `outbox_depth`."""
    store = Store(f"sqlite:///{tmp_path / 'outbox.db'}")
    try:
        for chat in ("1", "2"):
            store.enqueue("telegram", "send", {"chat_id": chat, "text": "queued"})
        store.enqueue("slack", "post", {"channel": "C1", "text": "card"})
        sent = store.enqueue("slack", "post", {"channel": "C1", "text": "delivered"})
        store.outbox_done(sent)
        tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        store.enqueue("slack", "post", {"channel": "C1", "text": "later"}, key="later", not_before=tomorrow)
        assert store.outbox_depths() == {"telegram": 2, "slack": 1}  # sent and not yet due: not late
        assert store.outbox_depths("slack") == {"slack": 1} and store.outbox_depths("none") == {}
        assert (store.outbox_depth(), store.outbox_depth("telegram"), store.outbox_depth("none")) == (3, 2, 0)
        got = samples(generate_latest(operations_registry(store)).decode())
    finally:
        store.close()
    assert {labels[0][1]: n for (name, labels), n in got.items() if name == "apprentice_outbox_depth"} == {
        "telegram": 2,
        "slack": 1,
    }


# --- ops/ asks only for what the app exposes -------------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and ranges left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries, Grafana's $__rate_interval too
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[match.end():].lstrip().startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue  # a function call or an operator
        names.add(match.group())
    return names


def test_metric_names_are_read_out_of_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le) (rate(a_bucket{status="ok", x=~"y|z"}[$__rate_interval])))'
            ' / on (instance) group_left max without (job) (b_total offset 5m) > bool 2 or vector(0)')
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("up == 0 and (time() - c) > 1e3") == {"up", "c"}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names a running App serves on /metrics after one answered question."""

    async def run() -> str:
        tmp = tmp_path_factory.mktemp("exposed")
        async with FakeOpenAIServer("shop-model") as fake, App(metrics_settings(tmp, fake.base_url)) as app:
            await app.start_http()
            [answer] = await app.service.handle(Inbound("ops", "1", "c1", "Can I return my bike?"))
            assert answer.message_id is not None
            return (await scrape(app))[1]

    names = exposed_names(asyncio.run(run()))
    assert "apprentice_model_requests_total" in names and "apprentice_outbox_depth" in names
    return names


def test_alert_rules_exist_and_use_only_exposed_metrics(exposed: set[str]) -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
             for r in g["rules"] if "alert" in r}
    # the alerts ops needs, and a metric each one must watch
    required = {
        "ApprenticeNoAnswers": "apprentice_answer_latency_seconds_count",
        "ApprenticeOutboxGrowing": "apprentice_outbox_depth",
        "ApprenticeTrainingFailed": "apprentice_training_runs",
        "ApprenticeAdapterErrors": "apprentice_adapter_errors_total",
        "ApprenticeModelQueueFull": "apprentice_model_queue_depth",
    }
    assert set(required) <= set(rules), sorted(set(required) - set(rules))
    for name, watched in required.items():
        assert watched in metric_names(rules[name]["expr"]), name
    for name, rule in rules.items():
        used = metric_names(rule["expr"])
        assert used, f"{name} selects no metric"
        assert used <= exposed, f"{name} uses {sorted(used - exposed)}, which the app does not expose"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"], name


def test_prometheus_loads_the_alert_rules() -> None:
    config = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    assert (OPS / config["rule_files"][0]).resolve() == ALERTS  # relative to prometheus.yml
    compose = yaml.safe_load((OPS / "compose.yaml").read_text(encoding="utf-8"))
    volumes = compose["services"]["prometheus"]["volumes"]
    # mounted side by side, so the relative rule_files path resolves inside the container too
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    assert f"./{ALERTS.name}:/etc/prometheus/{config['rule_files'][0]}:ro" in volumes


def test_grafana_dashboard_panels_query_only_exposed_metrics(exposed: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    assert {i["name"] for i in dashboard["__inputs"]} == {"DS_PROMETHEUS"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used: set[str] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            names = metric_names(target["expr"])
            assert names, f"{panel['title']}: {target['expr']}"
            assert names <= exposed, f"{panel['title']} uses {sorted(names - exposed)}, which is not exposed"
            used |= names
    # every metric the app exposes has a panel (the _created series are the library's, not ours)
    ours = {n for n in exposed if n.startswith("apprentice_") and not n.endswith("_created")}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = {n for n in ours if n not in used and re.sub(r"_(bucket|sum|count)$", "", n) not in bases}
    assert not missing, f"no panel shows {sorted(missing)}"
