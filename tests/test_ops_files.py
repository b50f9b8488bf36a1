"""The deployment files, checked by real validators and against the code they configure.

- ops/compose.yaml against the compose-spec JSON schema vendored in check-jsonschema, and (when a
  `docker compose` / `docker-compose` binary is on PATH) resolved by Compose itself;
- every Kubernetes object in ops/k8s against the API schemas of one pinned Kubernetes version,
  strictly (kubernetes-validate: an unknown or misspelt field fails);
- every environment variable the ops files and the README's .env example set, if it is an
  APPRENTICE_* or token name, is a field of knowledge.settings.Settings;
- the Slack manifest's /apprentice usage hint names every verb the code answers, the Dockerfile's
  build-time model export calls functions that exist, the Grafana dashboards are JSON, and the
  compose, Kubernetes and Caddy files agree with each other.
"""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from knowledge.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
K8S = OPS / "k8s"
# the Kubernetes version the manifests are checked against (Ingress v1, CronJob timeZone)
KUBERNETES_VERSION = "1.33.0"
SETTING_LIKE = re.compile(r"^(APPRENTICE_[A-Z0-9_]+|TELEGRAM_[A-Z0-9_]+|SLACK_[A-Z0-9_]+)$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def known_variables() -> set[str]:
    return {env_name(name) for name in Settings.model_fields}


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((OPS / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def kube_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, doc) for p in sorted(K8S.glob("*.yaml")) for doc in load_all(p)]


def deploy_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## Deploy")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def apprentice_services(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in data["services"].items() if (s.get("image") or "").startswith("apprentice")}


def env_keys(environment: Any) -> list[str]:
    if isinstance(environment, dict):
        return list(environment)
    return [str(item).split("=", 1)[0] for item in environment or []]


def pod_templates(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    kind = obj["kind"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield obj["spec"]["template"]["spec"]
    elif kind == "CronJob":
        yield obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield obj["spec"]


# --- the variables ---------------------------------------------------------------------------------
def variables_set_by_the_ops_files() -> set[tuple[str, str]]:
    """(where, NAME) for every environment variable a deployment file sets or reads."""
    found: set[tuple[str, str]] = set()
    data = compose()
    for name, svc in data["services"].items():
        found |= {(f"compose.yaml:{name}.environment", key) for key in env_keys(svc.get("environment"))}
    text = (OPS / "compose.yaml").read_text(encoding="utf-8")
    found |= {("compose.yaml:${...}", key) for key in INTERPOLATION.findall(text)}
    for path, obj in kube_objects():
        where = f"k8s/{path.name}:{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("ConfigMap", "Secret"):
            found |= {(where, key) for key in {**obj.get("data", {}), **obj.get("stringData", {})}}
        for spec in pod_templates(obj):
            for container in spec.get("initContainers", []) + spec["containers"]:
                for item in container.get("env", []):
                    found.add((where, item["name"]))
                    ref = item.get("valueFrom", {}).get("secretKeyRef") or {}
                    if ref.get("name") == "apprentice-secrets":
                        found.add((where + " secretKeyRef", ref["key"]))
    for path in sorted((OPS / "systemd").iterdir()):
        text = path.read_text(encoding="utf-8")
        if path.name.endswith((".env", ".env.example")):
            keys = re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", text, re.M)
            found |= {(f"systemd/{path.name}", k) for k in keys}
        else:
            for line in re.findall(r"^Environment=(.*)$", text, re.M):
                found |= {(f"systemd/{path.name}", k) for k in re.findall(r"([A-Z_][A-Z0-9_]*)=", line)}
    for path in ROOT.glob("*.env.example"):
        text = path.read_text(encoding="utf-8")
        found |= {(path.name, k) for k in re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", text, re.M)}
    return found | readme_env_example()


def readme_env_example() -> set[tuple[str, str]]:
    """The variables of the README's .env example (the fenced block that starts with `# .env`)."""
    blocks = re.findall(r"```[a-z]*\n(# \.env.*?)```", deploy_section(), re.S)
    assert blocks, "README 'Deploy' has no ```-fenced block starting with '# .env'"
    return {("README.md#deploy .env", k) for k in re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", blocks[0], re.M)}


def unknown_settings(found: set[tuple[str, str]], known: set[str]) -> list[tuple[str, str]]:
    return sorted((where, name) for where, name in found if SETTING_LIKE.match(name) and name not in known)


def test_every_variable_the_ops_files_set_is_a_setting() -> None:
    found = variables_set_by_the_ops_files()
    assert not unknown_settings(found, known_variables()), (
        "ops files set variables that knowledge/settings.py does not define (a typo, or a setting that "
        f"was renamed): {unknown_settings(found, known_variables())}"
    )
    names = {name for _, name in found}
    # the settings a deployment cannot do without are among them
    assert {
        "APPRENTICE_KB", "APPRENTICE_DATABASE_URL", "APPRENTICE_CHROMA_URL", "APPRENTICE_RETRAIN_CRON",
        "APPRENTICE_TELEGRAM_WEBHOOK_URL", "APPRENTICE_LLM_API_KEY", "TELEGRAM_BOT_TOKEN", "SLACK_BOT_TOKEN",
        "SLACK_SIGNING_SECRET", "APPRENTICE_SLACK_CHANNEL",
    } <= names  # fmt: skip


def test_the_variable_check_catches_a_misspelt_name() -> None:
    found = {("compose.yaml:bot-1.environment", "APPRENTICE_DATABSE_URL"), ("x", "SLACK_BOT_TOKEN"),
             ("x", "DOMAIN")}  # fmt: skip
    assert unknown_settings(found, known_variables()) == [
        ("compose.yaml:bot-1.environment", "APPRENTICE_DATABSE_URL")
    ]


def test_the_readme_env_example_names_only_settings_and_compose_variables() -> None:
    """Each line of the README's .env is a setting, or a variable ops/compose.yaml interpolates."""
    compose_vars = set(INTERPOLATION.findall((OPS / "compose.yaml").read_text(encoding="utf-8")))
    for _, name in readme_env_example():
        assert name in known_variables() or name in compose_vars, f"README .env example: {name} is unused"
    # and every variable compose needs from it is explained there
    text = (OPS / "compose.yaml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    assert required <= {name for _, name in readme_env_example()}


# --- validators ----------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
         str(OPS / "compose.yaml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _compose_binary() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and "version" in probe.stdout.lower():
            return command
    return None


def test_compose_resolves_the_env_file_from_the_repository_root(tmp_path: Path) -> None:
    """Compose itself (no daemon needed for `config`): .env at the root reaches the containers."""
    command = _compose_binary()
    if command is None:
        pytest.skip("no `docker compose` or `docker-compose` on PATH")
    shutil.copytree(OPS, tmp_path / "ops")
    (tmp_path / "kb").mkdir()
    (tmp_path / ".env").write_text(
        "DOMAIN=bot.example.com\nTELEGRAM_BOT_TOKEN=123:abc\nSLACK_BOT_TOKEN=xoxb-1\n"
        "SLACK_SIGNING_SECRET=s3cret\nAPPRENTICE_SLACK_CHANNEL=C0123\nAPPRENTICE_LLM_API_KEY=k3y\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [*command, "--env-file", ".env", "-f", "ops/compose.yaml", "--profile", "gpu", "--profile", "retrain",
         "config"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    for name in ("bot-1", "bot-2", "retrain"):
        env = resolved[name]["environment"]
        assert env["TELEGRAM_BOT_TOKEN"] == "123:abc" and env["SLACK_SIGNING_SECRET"] == "s3cret", name
        assert env["APPRENTICE_TELEGRAM_WEBHOOK_URL"] == "https://bot.example.com/telegram"
        assert env["APPRENTICE_KB"] == "/kb" and env["APPRENTICE_RETRAIN_CRON"] == "off"
        kb = next(v for v in resolved[name]["volumes"] if v["target"] == "/kb")
        assert kb["source"] == str(tmp_path / "kb") and kb["read_only"]
    assert resolved["vllm"]["environment"]["VLLM_API_KEY"] == "k3y"
    assert resolved["caddy"]["environment"]["DOMAIN"] == "bot.example.com"


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_objects_match_the_api_schema(path: Path) -> None:
    import kubernetes_validate

    for doc in load_all(path):
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{path.name}: {doc['kind']}/{doc['metadata']['name']}"
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")


@pytest.mark.parametrize("path", sorted(OPS.rglob("*.json")), ids=lambda p: str(p.relative_to(OPS)))
def test_json_files_parse(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    if "grafana" in path.parts:
        assert data.get("panels"), f"{path.name}: a Grafana dashboard without panels"


# --- the code the files configure ----------------------------------------------------------------
def slack_verbs() -> set[str]:
    source = (ROOT / "bot" / "staff_commands.py").read_text(encoding="utf-8")
    body = source[source.index("async def run(") :]
    body = body[: body.index("\n    async def ", 1) if "\n    async def " in body[1:] else len(body)]
    verbs = set(re.findall(r'verb == "([a-z]+)"', body))
    for group in re.findall(r"verb in \(([^)]*)\)", body):
        verbs |= set(re.findall(r'"([a-z]+)"', group))
    return verbs


def test_the_slash_command_usage_hint_lists_every_verb() -> None:
    verbs = slack_verbs()
    assert {"status", "corrections", "revoke"} <= verbs  # the parser above still finds them
    manifest = yaml.safe_load((OPS / "slack-manifest.yaml").read_text(encoding="utf-8"))
    [command] = [c for c in manifest["features"]["slash_commands"] if c["command"] == "/apprentice"]
    hinted = {word for word in re.findall(r"[a-z]+", command["usage_hint"])}
    assert verbs <= hinted, f"usage_hint misses {sorted(verbs - hinted)}"
    assert len(command["usage_hint"]) <= 1000 and len(command["description"]) <= 2000  # Slack's limits
    assert set(command) <= {"command", "description", "usage_hint", "should_escape", "url"}


def test_the_dockerfile_build_time_export_calls_what_exists() -> None:
    text = (OPS / "Dockerfile").read_text(encoding="utf-8")
    snippets = re.findall(r'python -c "([^"]+)"', text)
    imports = [(m, n) for s in snippets for m, names in re.findall(r"from ([\w.]+) import ([\w, ]+)", s)
               for n in names.split(",")]  # fmt: skip
    assert ("learning.runtime", " build_local") in imports or ("learning.runtime", "build_local") in imports
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name.strip()), f"{module}.{name.strip()}"
    # build-time files land in the image's model cache, which the runtime reads
    assert "ENV APPRENTICE_MODEL_CACHE=/opt/apprentice/models" in text


def test_compose_takes_operator_settings_from_the_env_file_only() -> None:
    data = compose()
    for name, svc in apprentice_services(data).items():
        files = [f["path"] if isinstance(f, dict) else f for f in svc.get("env_file", [])]
        assert files == ["../.env"], name  # relative to ops/: the repository root's .env
        for key, value in (svc.get("environment") or {}).items():
            # `KEY: ${KEY:-}` would replace the env_file's value with the shell's, or with nothing
            assert not re.fullmatch(r"\$\{" + key + r"(:?[-?].*)?\}", str(value)), f"{name}: {key}"
            assert not key.startswith(("TELEGRAM_", "SLACK_")) and "TOKEN" not in key, f"{name}: {key}"
        env = svc["environment"]
        assert env["APPRENTICE_KB"] == "/kb" and env["APPRENTICE_RETRAIN_CRON"] == "off", name
        [kb] = [v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == "/kb"]
        assert kb["read_only"] and kb["bind"]["create_host_path"] is False, name


def test_compose_trains_outside_the_replicas() -> None:
    services = compose()["services"]
    assert services["retrain"]["command"] == ["retrain"] and services["retrain"]["profiles"]
    assert services["retrain"]["restart"] == "no"
    assert services["trainer"]["command"] == ["retrain"]


def test_vllm_is_the_same_in_compose_and_kubernetes() -> None:
    vllm = compose()["services"]["vllm"]
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in kube_objects()}
    pod = objects[("Deployment", "apprentice-vllm")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    image = vllm["image"]
    assert re.fullmatch(r"vllm/vllm-openai:v\d+\.\d+\.\d+", image), "pin vLLM to a release"
    assert container["image"] == image
    # `vllm serve MODEL`: the entrypoint is set explicitly and the model is the first, positional argument
    assert vllm["entrypoint"] == ["vllm", "serve"] and container["command"] == ["vllm", "serve"]
    compose_model, k8s_model = vllm["command"][0], container["args"][0]
    assert compose_model.startswith("/data/base/") and k8s_model.startswith("/data/base/")
    assert not any(a.startswith("--model") for a in vllm["command"] + container["args"])
    # the base is written into the shared volume by `apprentice export-base` before vLLM starts
    base = compose()["services"]["vllm-base"]
    assert base["command"][0] == "export-base" and base["command"][1] == compose_model
    [init] = pod["initContainers"]
    assert init["args"] == ["export-base", k8s_model]
    assert vllm["depends_on"]["vllm-base"]["condition"] == "service_completed_successfully"
    # the API key: vLLM's VLLM_API_KEY (= --api-key) is the bot's APPRENTICE_LLM_API_KEY
    assert vllm["environment"]["VLLM_API_KEY"].startswith("${APPRENTICE_LLM_API_KEY")
    key = next(e for e in container["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "apprentice-secrets", "key": "APPRENTICE_LLM_API_KEY"}
    assert "data:/data:ro" in vllm["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]


def test_kubernetes_routes_the_webhooks_over_tls_to_the_bot() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in kube_objects()}
    ingress = objects[("Ingress", "apprentice-bot")]["spec"]
    config = objects[("ConfigMap", "apprentice-config")]["data"]
    service = objects[("Service", "apprentice-bot")]["spec"]
    [rule] = ingress["rules"]
    assert ingress["tls"][0]["hosts"] == [rule["host"]]
    assert config["APPRENTICE_TELEGRAM_WEBHOOK_URL"] == f"https://{rule['host']}/telegram"
    paths = {p["path"]: p["backend"]["service"] for p in rule["http"]["paths"]}
    assert set(paths) == {"/telegram", "/slack/events"}  # /metrics and the probes stay in the cluster
    port_names = {p["name"] for p in service["ports"]}
    for backend in paths.values():
        assert backend["name"] == "apprentice-bot" and backend["port"]["name"] in port_names
    # the bot pods train nothing (the CronJob does) and read the documents from a read-only /kb
    assert config["APPRENTICE_RETRAIN_CRON"] == "off" and config["APPRENTICE_KB"] == "/kb"
    bot = objects[("Deployment", "apprentice-bot")]["spec"]["template"]["spec"]
    assert {"name": "kb", "mountPath": "/kb", "readOnly": True} in bot["containers"][0]["volumeMounts"]
    claim = next(v for v in bot["volumes"] if v["name"] == "kb")["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    cron = objects[("CronJob", "apprentice-train")]["spec"]
    assert cron["timeZone"] == config["APPRENTICE_TIMEZONE"]


def test_caddy_fronts_the_replicas_over_https() -> None:
    services = compose()["services"]
    bots = sorted(n for n, s in apprentice_services(compose()).items() if "profiles" not in s)
    caddyfile = (OPS / "Caddyfile").read_text(encoding="utf-8")
    upstreams = re.search(r"^\s*reverse_proxy ([^{\n]+)\{", caddyfile, re.M)
    assert upstreams and sorted(upstreams.group(1).split()) == [f"{b}:8080" for b in bots]
    assert re.search(r"^\{\$DOMAIN\} \{", caddyfile, re.M)
    assert "health_uri /readyz" in caddyfile and "respond /metrics 404" in caddyfile
    caddy = services["caddy"]
    assert "443:443" in caddy["ports"] and "80:80" in caddy["ports"]  # Telegram: 443, 80, 88 or 8443
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert caddy["environment"]["DOMAIN"].startswith("${DOMAIN:?")
    assert not (OPS / "nginx.conf").exists()


def test_systemd_env_example_sets_the_documents_and_the_schedule() -> None:
    text = (OPS / "systemd" / "apprentice.env.example").read_text(encoding="utf-8")
    values = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", text, re.M))
    assert values["APPRENTICE_KB"].startswith("/")
    assert values["APPRENTICE_TIMEZONE"] and values["APPRENTICE_RETRAIN_CRON"]
    timer = configparser.ConfigParser(interpolation=None)
    timer.read_string((OPS / "systemd" / "apprentice-retrain.timer").read_text(encoding="utf-8"))
    assert timer["Timer"]["OnCalendar"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify`, ignoring only the absent /opt/apprentice install."""
    units = []
    for unit in sorted((OPS / "systemd").glob("*.service")) + sorted((OPS / "systemd").glob("*.timer")):
        name = unit.name.replace("@.", "@8081.")
        shutil.copy(unit, tmp_path / name)
        units.append(str(tmp_path / name))
    done = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )  # fmt: skip
    problems = [
        line for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "/opt/apprentice/.venv/bin/" not in line
    ]  # fmt: skip
    assert not problems, "\n".join(problems)
