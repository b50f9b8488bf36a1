"""The deployment files in ops/: what can be checked without Docker or a cluster is checked here.

YAML parses, the compose topology is the one the README describes, Kubernetes objects are
well-formed and wired to each other, and every setting the files name exists in Settings.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowledge.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
VARIABLE = re.compile(r"\b(APPRENTICE_[A-Z0-9_]+|TELEGRAM_BOT_TOKEN|SLACK_[A-Z_]+_(?:TOKEN|SECRET))\b")


def known_variables() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}


def ops_files() -> list[Path]:
    return sorted(p for p in OPS.rglob("*") if p.is_file())


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((OPS / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def replicas(services: dict[str, Any]) -> list[str]:
    """The always-on bot services (the one-shot `retrain` and `vllm-base` run the same image)."""
    return sorted(
        n
        for n, s in services.items()
        if (s.get("image") or "").startswith("apprentice:") and "profiles" not in s
    )


def deploy_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Deploy")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("path", [p for p in ops_files() if p.suffix in (".yaml", ".yml")], ids=str)
def test_every_yaml_file_loads(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


def test_every_setting_named_in_ops_and_the_readme_exists() -> None:
    known = known_variables()
    sources = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in ops_files()}
    sources["README.md#deploy"] = deploy_section()
    unknown = {
        (where, name)
        for where, text in sources.items()
        for name in VARIABLE.findall(text)
        if name not in known
    }
    assert not unknown, f"settings that knowledge/settings.py does not define: {sorted(unknown)}"
    named = {name for text in sources.values() for name in VARIABLE.findall(text)}
    assert {"APPRENTICE_DATABASE_URL", "APPRENTICE_CHROMA_URL", "APPRENTICE_LLM_URL"} <= named


def test_compose_runs_two_replicas_on_shared_engines_and_vllm_under_gpu() -> None:
    data = compose()
    services = data["services"]
    bots = replicas(services)
    assert len(bots) == 2
    for name in bots:
        env = services[name]["environment"]
        assert env["APPRENTICE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in env["APPRENTICE_DATABASE_URL"]
        assert env["APPRENTICE_CHROMA_URL"] == "http://chroma:8000"
        assert env["APPRENTICE_HTTP_HOST"] == "0.0.0.0"
        assert "profiles" not in services[name]
        assert "data:/data" in services[name]["volumes"]
        assert "/readyz" in " ".join(services[name]["healthcheck"]["test"])
    assert {"postgres", "chroma", "prometheus", "caddy"} <= set(services)
    vllm = services["vllm"]
    assert vllm["profiles"] == ["gpu"] and services["trainer"]["profiles"] == ["gpu"]
    args = " ".join(vllm["command"])
    assert "--enable-lora" in args and "--served-model-name=${APPRENTICE_MODEL" in args
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # adapters are read by vLLM at the path the trainer wrote them: the same volume at the same place
    assert "data:/data:ro" in vllm["volumes"] and "data:/data" in services["trainer"]["volumes"]
    gpu = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert set(data["volumes"]) >= {"data", "pgdata", "chroma"}


def test_compose_interpolations_are_well_formed() -> None:
    text = (OPS / "compose.yaml").read_text(encoding="utf-8")
    for match in re.finditer(r"\$\{([^}]*)\}", text):
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?", match.group(1)), match.group(0)
    assert "$" not in re.sub(r"\$\{[^}]*\}", "", text), "a bare $ would be interpolated by compose"


def test_prometheus_and_the_balancer_point_at_the_replicas() -> None:
    services = compose()["services"]
    bots = replicas(services)
    prom = yaml.safe_load((OPS / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "apprentice")
    assert job["metrics_path"] == "/metrics"
    assert sorted(job["static_configs"][0]["targets"]) == [f"{b}:8080" for b in bots]
    caddy = (OPS / "Caddyfile").read_text(encoding="utf-8")
    upstreams = re.search(r"^\s*reverse_proxy ([^{\n]+)\{", caddy, re.M)
    assert upstreams and sorted(upstreams.group(1).split()) == [f"{b}:8080" for b in bots]
    assert "method GET POST" in caddy  # retrying a webhook POST elsewhere is safe (de-dup in the DB)


def test_dockerfiles_build_what_the_repo_has_and_serve_on_the_configured_port() -> None:
    for name, command in (("Dockerfile", '["serve"]'), ("Dockerfile.cuda", '["retrain"]')):
        text = (OPS / name).read_text(encoding="utf-8")
        assert re.search(r"^FROM \S+", text, re.M)
        assert 'ENTRYPOINT ["apprentice"]' in text and f"CMD {command}" in text
        for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for part in src.split():
                assert (ROOT / part).exists(), f"{name} copies {part}, which the repo does not have"
        for var in VARIABLE.findall(text):
            assert var in known_variables()
    cpu = (OPS / "Dockerfile").read_text(encoding="utf-8")
    port = re.search(r"APPRENTICE_HTTP_PORT=(\d+)", cpu)
    assert port and f"EXPOSE {port.group(1)}" in cpu and f":{port.group(1)}/healthz" in cpu
    assert "download.pytorch.org/whl/cpu" in cpu  # never the multi-GB CUDA wheel in the bot image


def kube_objects() -> list[dict[str, Any]]:
    return [doc for p in sorted((OPS / "k8s").glob("*.yaml")) for doc in load_all(p)]


def test_kubernetes_objects_are_well_formed_and_wired() -> None:
    objects = kube_objects()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    config = by_kind["ConfigMap"]["apprentice-config"]["data"]
    secret = by_kind["Secret"]["apprentice-secrets"]["stringData"]
    assert set(config) | set(secret) <= known_variables()
    assert config["APPRENTICE_LLM_URL"].startswith("http://apprentice-vllm:")
    claims = set(by_kind["PersistentVolumeClaim"])
    services = by_kind["Service"]

    def pod_specs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        out = []
        for kind in ("Deployment", "StatefulSet", "Job"):
            for name, obj in by_kind.get(kind, {}).items():
                out.append((name, obj["spec"]["template"], obj["spec"].get("selector", {})))
        for name, obj in by_kind.get("CronJob", {}).items():
            out.append((name, obj["spec"]["jobTemplate"]["spec"]["template"], {}))
        return out

    for name, template, selector in pod_specs():
        labels = template["metadata"]["labels"]
        if selector:
            assert selector["matchLabels"].items() <= labels.items(), name
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in template["spec"]["containers"]:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref["name"] in {"apprentice-config", "apprentice-secrets"}, name
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            if any(v.get("persistentVolumeClaim", {}).get("claimName") == "apprentice-data"
                   for v in template["spec"].get("volumes", [])):
                assert "/data" in mounts, f"{name} must mount the shared data at /data (adapter paths)"
    pod_labels = [template["metadata"]["labels"] for _, template, _ in pod_specs()]
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pod_labels), f"{name} selects no pods"

    bot = by_kind["Deployment"]["apprentice-bot"]
    assert bot["spec"]["replicas"] >= 2
    [container] = bot["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["ports"][0]["containerPort"] == int(config["APPRENTICE_HTTP_PORT"])
    annotations = bot["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"

    vllm = by_kind["Deployment"]["apprentice-vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert "--enable-lora" in vllm["args"] and vllm["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    served = next(a for a in vllm["args"] if a.startswith("--served-model-name="))
    assert served.split("=", 1)[1].split()[0] == config["APPRENTICE_MODEL"]

    cron = by_kind["CronJob"]["apprentice-train"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert len(cron["schedule"].split()) == 5
    train = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert train["args"][0] == "retrain" and train["resources"]["limits"]["nvidia.com/gpu"] >= 1


def test_systemd_units_parse_and_run_the_cli() -> None:
    units = sorted((OPS / "systemd").glob("*.service")) + sorted((OPS / "systemd").glob("*.timer"))
    assert units
    for unit in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(unit.read_text(encoding="utf-8"))
        assert parser.has_section("Unit"), unit
        if unit.suffix == ".service":
            exec_start = parser["Service"]["ExecStart"]
            assert exec_start.startswith("/opt/apprentice/.venv/bin/"), unit
        else:
            assert parser.has_section("Timer") and parser["Timer"]["OnCalendar"]
    replica = (OPS / "systemd" / "apprentice@.service").read_text(encoding="utf-8")
    assert "ExecStart=/opt/apprentice/.venv/bin/apprentice serve" in replica
    assert "Environment=APPRENTICE_HTTP_PORT=%i" in replica
    env_example = (OPS / "systemd" / "apprentice.env.example").read_text(encoding="utf-8")
    assigned = re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", env_example, re.M)
    assert assigned and set(assigned) <= known_variables()
