"""docker-compose.yml, deploy/kubernetes and the Grafana dashboard, checked offline (no Docker, no
broker, no cluster):

- against schemas from packages: compose-spec's JSON Schema (as vendored by check-jsonschema on
  PyPI), Kubernetes' (kubernetes-validate on PyPI), KEDA's (@kubernetes-models/keda on npm, run by
  node through tests/js/validate_keda.mjs); no package ships Strimzi's KafkaTopic schema, so its
  fields are checked here by hand after Strimzi's CRD (v1beta2);
- against the code: every topic and table they name is declared (headwater/topics.py, the
  migrations), every command is one the CLI accepts, every environment builds valid Settings,
  consumer groups and image names agree, and the generated files are what ``headwater manifests``
  writes;
- the dashboard's SQL runs on chDB with the migrations applied, and its PromQL names metrics that
  headwater/metrics.py defines, with their labels.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from headwater import deploy
from headwater.cli import app
from headwater.settings import Settings
from headwater.status import STAGES
from headwater.topics import ALL_TOPICS
from sinks.clickhouse.migrate import script
from tests.docker.servers import CLICKHOUSE_IMAGE, KAFKA_IMAGE
from tests.unit.test_cluster_schema import run_chdb

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
KUBERNETES_DIR = ROOT / "deploy" / "kubernetes"
GRAFANA_DIR = ROOT / "deploy" / "compose" / "grafana"
JS_DIR = ROOT / "tests" / "js"
KUBERNETES_VERSION = "1.30"  # the oldest minor version the manifests target (ADR 0014)
IMAGE = "headwater"  # deploy/Dockerfile's image, in compose (headwater:local) and Kubernetes


# ------------------------------------------------------------------------------------------ loading


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBERNETES_DIR / "kustomization.yaml").read_text())


def k8s_resources() -> list[dict[str, Any]]:
    docs = []
    for name in kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((KUBERNETES_DIR / name).read_text()) if d is not None]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA_DIR / "dashboards" / "headwater.json").read_text())


def declared_topics(prefix: str = "") -> set[str]:
    return {spec.name(prefix) for spec in ALL_TOPICS}


def migration_tables(database: str = "headwater") -> set[str]:
    """Every table and view the migrations (and their bookkeeping) create, on one server or in
    cluster mode (the ``X_local`` tables)."""
    created = re.compile(rf"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE|MATERIALIZED\s+VIEW|VIEW)\s+(?:IF\s+NOT\s+EXISTS\s+)?{database}\.(\w+)")
    statements = script(database) + script(database, "cluster")
    return {m.group(1) for statement in statements for m in created.finditer(statement)}


_SQL_TABLE = re.compile(r"\b(?:FROM|JOIN|INTO)\s+headwater\.(\w+)", re.I)


def unknown_tables(text: str) -> set[str]:
    """The ``headwater.X`` tables that SQL in ``text`` reads or writes and no migration creates."""
    return {m.group(1) for m in _SQL_TABLE.finditer(text)} - migration_tables()


def undeclared_topics(docs: list[dict[str, Any]], prefix: str) -> set[str]:
    """The topics Kubernetes resources name (KafkaTopics, KEDA kafka triggers) that topics.py does not declare."""
    named = {d["spec"]["topicName"] for d in of_kind(docs, "KafkaTopic")}
    named |= {t["metadata"]["topic"] for so in of_kind(docs, "ScaledObject") for t in so["spec"]["triggers"]
              if t["type"] == "kafka"}
    return named - declared_topics(prefix)


def compose_value(text: str) -> str:
    """A compose string after interpolation with an empty environment: ``${VAR:-default}`` is the
    default, ``$$`` a literal ``$``. Anything else would need the user's environment: refused."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)
    assert not re.search(r"\$(?!\$)[{\w]", text.replace("$$", "")), f"needs the environment: {text!r}"
    return text.replace("$$", "$")


def cli_check(argv: list[str]) -> str:
    """Parse ``headwater ARGV`` with the real CLI, without running it; returns the command's name.
    Unknown commands and options, and bad values, raise the CLI's usage error."""
    assert argv and argv[0] == "headwater", argv
    group = __import__("typer").main.get_command(app)
    ctx = group.make_context("headwater", list(argv[1:]))
    command = group.get_command(ctx, argv[1])
    assert command is not None, f"no command {argv[1]!r} in {argv}"
    command.make_context(argv[1], list(argv[2:]), parent=ctx)
    return argv[1]


def compose_argv(command: list[str]) -> list[str]:
    """The headwater command line of a compose ``command`` (also inside ``sh -c "exec headwater ..."``)."""
    command = [compose_value(part) for part in command]
    if command[:2] == ["sh", "-c"]:
        words = shlex.split(command[2])
        return words[1:] if words[0] == "exec" else words
    return command


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as a process with ``env`` (and no other HEADWATER_ variable) builds them."""
    import os

    for key in [k for k in os.environ if k.startswith("HEADWATER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


# -------------------------------------------------------------------------------- generated files


def test_generated_files_are_what_headwater_manifests_writes():
    for path, text in deploy.generated_files().items():
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: run `headwater manifests`"
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from the code's declarations: run `headwater manifests`"


def test_manifests_check_reports_a_stale_file_and_fails(tmp_path, monkeypatch):
    stale = tmp_path / "kafka-topics.yaml"
    stale.write_text("# edited by hand\n")
    fresh = tmp_path / "schema.yaml"
    fresh.write_text("ok\n")
    monkeypatch.setattr(deploy, "generated_files", lambda: {stale: "generated\n", fresh: "ok\n"})
    result = CliRunner().invoke(app, ["manifests", "--check"])
    assert result.exit_code == 1 and f"differs  {stale}" in result.output and str(fresh) not in result.output
    assert stale.read_text() == "# edited by hand\n"  # --check writes nothing
    result = CliRunner().invoke(app, ["manifests"])
    assert result.exit_code == 0 and stale.read_text() == "generated\n"


def test_manifests_outside_a_source_checkout_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a headwater source checkout"):
        deploy.generated_files(tmp_path)


def test_the_yaml_emitter_reads_back_as_the_same_data():
    data = {"a": "plain", "b": "yes", "c": "604800000", "d": "x: y", "e": 3, "f": ["one", {"g": "two", "h": [1]}],
            "i": "line 1\n\n  indented\n", "j": {}, "k": "", "l": "trailing\n\n", "m": "no newline\nat end",
            "strimzi.io/cluster": "headwater"}
    assert list(yaml.safe_load_all(deploy.yaml_documents([data, {"n": None}], "a\n\nheader"))) == [data, {"n": None}]


# ------------------------------------------------------------------------------------ docker compose


def compose_schema() -> dict[str, Any]:
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_spec_schema():
    assert compose_errors(compose()) == []


def test_the_compose_schema_refuses_a_misspelt_service_key():
    document = compose()
    document["services"]["sink"]["comand"] = document["services"]["sink"].pop("command")
    assert any("comand" in error for error in compose_errors(document))


HEADWATER_SERVICES = {"topics", "migrate", "identity", "sink", "capture", "demo"}


def test_every_python_service_runs_the_one_image_built_from_the_repo():
    services = compose()["services"]
    built = {name for name, s in services.items() if "build" in s}
    assert built == HEADWATER_SERVICES
    for name in built:
        assert services[name]["image"] == f"{IMAGE}:local", name
        assert services[name]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}, name
    assert (ROOT / "deploy" / "Dockerfile").is_file()


def test_compose_servers_are_the_images_the_docker_tests_run():
    services = compose()["services"]
    assert services["kafka"]["image"] == KAFKA_IMAGE
    assert services["clickhouse"]["image"] == CLICKHOUSE_IMAGE


def test_compose_commands_are_commands_the_cli_accepts():
    services = compose()["services"]
    commands = {name: cli_check(compose_argv(services[name]["command"])) for name in HEADWATER_SERVICES}
    assert commands == {"topics": "topics", "migrate": "migrate", "identity": "worker", "sink": "sink",
                        "capture": "capture", "demo": "demo"}
    assert compose_argv(services["demo"]["command"])[2:] == ["--send-only"]  # sends, starts no second pipeline


def test_the_cli_check_refuses_what_the_cli_refuses():
    from typer._click.exceptions import UsageError

    with pytest.raises(UsageError):
        cli_check(["headwater", "worker", "identity", "--worker", "x"])
    with pytest.raises(AssertionError):
        cli_check(["headwater", "wroker", "identity"])


def test_identity_workers_scale_with_distinct_worker_ids():
    identity = compose()["services"]["identity"]
    assert "container_name" not in identity and "ports" not in identity, "a fixed name or host port forbids --scale"
    argv = compose_argv(identity["command"])
    assert argv[argv.index("--worker-id") + 1] == "$(hostname)"  # each replica's own container hostname


def test_compose_environments_build_valid_settings(monkeypatch):
    services = compose()["services"]
    for name in sorted(HEADWATER_SERVICES):
        env = {k: compose_value(str(v)) for k, v in services[name]["environment"].items()}
        settings = settings_from(env, monkeypatch)
        assert not settings.embedded_kafka and not settings.embedded_clickhouse, name
        assert settings.bootstrap_servers == "kafka:9092" and settings.clickhouse.host == "clickhouse", name
        assert settings.clickhouse.database == "headwater", name
        assert settings.partitions >= 3, "`--scale identity=3` needs 3 partitions"


def test_prometheus_scrapes_every_service_that_serves_metrics(monkeypatch):
    services = compose()["services"]
    serving = {}
    for name in HEADWATER_SERVICES:
        env = {k: compose_value(str(v)) for k, v in services[name]["environment"].items()}
        where = settings_from(env, monkeypatch).metrics_host_port
        if where is not None:
            serving[name] = where[1]
    assert set(serving) == {"identity", "sink", "capture"}
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    scraped = {}
    for job in prometheus["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for service in sd["names"]:
                assert service in services, f"Prometheus scrapes {service}, which compose does not run"
                scraped[service] = sd["port"]
    assert scraped == serving


def test_compose_mounts_files_that_exist():
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_grafana_reads_clickhouse_as_the_read_only_analyst():
    sources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "headwater.yaml").read_text())["datasources"]
    clickhouse = next(s for s in sources if s["type"] == "grafana-clickhouse-datasource")
    assert clickhouse["jsonData"]["username"] == "analyst" and clickhouse["jsonData"]["host"] == "clickhouse"
    analyst = (ROOT / "deploy" / "clickhouse" / "users.d" / "analyst.xml").read_text()
    assert "<readonly>2</readonly>" in analyst and "GRANT SELECT ON headwater.*" in analyst
    assert f"<password>{clickhouse['secureJsonData']['password']}</password>" in analyst
    assert "grafana-clickhouse-datasource" in compose()["services"]["grafana"]["environment"]["GF_INSTALL_PLUGINS"]


# ----------------------------------------------------------------------------------------- Kubernetes


def config_data() -> dict[str, str]:
    return next(d for d in of_kind(k8s_resources(), "ConfigMap") if d["metadata"]["name"] == "headwater-config")["data"]


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            out += [(d["metadata"]["name"], c) for c in d["spec"]["template"]["spec"]["containers"]]
    return out


def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    present = {p.name for p in KUBERNETES_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


@pytest.mark.parametrize("doc", [d for d in k8s_resources() if "." not in d["apiVersion"].split("/")[0]
                                 or d["apiVersion"].split("/")[0].endswith(".k8s.io")],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_resources_follow_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_kubernetes_schema_refuses_a_wrong_field():
    deployment = copy.deepcopy(of_kind(k8s_resources(), "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def keda_errors(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: KEDA's schema comes from npm (@kubernetes-models/keda in tests/js)")
    if not (JS_DIR / "node_modules" / "@kubernetes-models" / "keda").is_dir():  # as test_posthog_js does
        npm = shutil.which("npm")
        assert npm, "@kubernetes-models/keda is not installed and npm is missing: run `npm ci --prefix tests/js`"
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS_DIR,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"npm ci in tests/js failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    done = subprocess.run([node, "validate_keda.mjs"], cwd=JS_DIR, input=json.dumps(resources),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_scaled_objects_follow_the_keda_schema():
    scaled = of_kind(k8s_resources(), "ScaledObject")
    assert scaled and {d["apiVersion"] for d in scaled} == {"keda.sh/v1alpha1"}
    assert keda_errors(scaled) == [{"kind": "ScaledObject", "name": d["metadata"]["name"], "errors": []} for d in scaled]


def test_the_keda_schema_refuses_a_trigger_without_a_type():
    broken = copy.deepcopy(of_kind(k8s_resources(), "ScaledObject")[0])
    del broken["spec"]["triggers"][0]["type"]
    [result] = keda_errors([broken])
    assert any("required property type" in e for e in result["errors"]), result


_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def test_kafka_topics_have_the_fields_strimzi_requires():
    """By hand, after Strimzi's KafkaTopic CRD (v1beta2): no package ships its schema."""
    target = deploy.KUBERNETES
    for topic in of_kind(k8s_resources(), "KafkaTopic"):
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert set(topic) == {"apiVersion", "kind", "metadata", "spec"}
        name = topic["metadata"]["name"]
        assert _DNS_SUBDOMAIN.match(name) and len(name) <= 253, name
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == target.strimzi_cluster
        spec = topic["spec"]
        assert set(spec) <= {"topicName", "partitions", "replicas", "config"}
        assert _TOPIC_NAME.match(spec["topicName"]) and spec["topicName"] not in (".", "..")
        assert isinstance(spec["partitions"], int) and spec["partitions"] >= 1
        assert isinstance(spec["replicas"], int) and 1 <= spec["replicas"] <= 32767
        assert all(isinstance(k, str) and isinstance(v, (str, int, bool)) for k, v in spec["config"].items())


def test_kubernetes_names_only_declared_topics_and_every_declared_topic_has_a_kafka_topic():
    docs = k8s_resources()
    prefix = config_data()["HEADWATER_TOPIC_PREFIX"]
    assert undeclared_topics(docs, prefix) == set()
    assert {d["spec"]["topicName"] for d in of_kind(docs, "KafkaTopic")} == declared_topics(prefix)


def test_a_topic_missing_from_the_declarations_is_caught():
    docs = copy.deepcopy(k8s_resources())
    of_kind(docs, "ScaledObject")[0]["spec"]["triggers"][0]["metadata"]["topic"] = "events_raw_v2"
    of_kind(docs, "KafkaTopic")[0]["spec"]["topicName"] = "events_rawx"
    assert undeclared_topics(docs, "") == {"events_raw_v2", "events_rawx"}


def test_topic_sizes_agree_with_the_processes_settings(monkeypatch):
    settings = settings_from({**config_data(), "HEADWATER_CLICKHOUSE_URL": "http://u:p@ch:8123/headwater"}, monkeypatch)
    target = deploy.KUBERNETES
    assert (settings.partitions, settings.replication_factor, settings.topic_prefix, settings.clickhouse_cluster) == \
        (target.partitions, target.replicas, target.topic_prefix, target.clickhouse_cluster)
    assert settings.clickhouse.database == target.database
    by_name = {d["spec"]["topicName"]: d["spec"] for d in of_kind(k8s_resources(), "KafkaTopic")}
    for spec in ALL_TOPICS:
        topic = by_name[spec.name(settings.topic_prefix)]
        assert topic["partitions"] == (spec.partitions or settings.partitions), spec.base
        assert topic["replicas"] == settings.replication_factor
        assert spec.all_configs().items() <= topic["config"].items(), spec.base
        assert int(topic["config"]["min.insync.replicas"]) < topic["replicas"]


def test_the_schema_config_map_is_the_migrate_print_of_the_cluster():
    settings_cluster = config_data()["HEADWATER_CLICKHOUSE_CLUSTER"]
    printed = CliRunner().invoke(app, ["migrate", "--print", "--cluster", settings_cluster],
                                 env={"HEADWATER_CLICKHOUSE_URL": "http://u:p@ch:8123/headwater"})
    assert printed.exit_code == 0, printed.output
    schema = next(d for d in k8s_resources() if d["metadata"]["name"] == "headwater-clickhouse-schema")
    assert schema["data"]["schema.sql"] == printed.output
    assert "ENGINE = Distributed('headwater', 'headwater', 'events_local'" in printed.output


def test_containers_run_the_one_image_with_commands_the_cli_accepts():
    docs = k8s_resources()
    images = {i["name"]: i for i in kustomization()["images"]}
    assert set(images) == {IMAGE}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert images[IMAGE]["newTag"] == version
    assert compose()["services"]["sink"]["image"].split(":")[0] == IMAGE
    commands = {}
    for owner, container in containers(docs):
        assert container["image"] == IMAGE, owner
        defined = {e["name"] for e in container.get("env", [])}
        for word in container["command"]:
            for ref in re.findall(r"\$\((\w+)\)", word):
                assert ref in defined, f"{owner} expands $({ref}), which it does not define"
        commands[owner] = cli_check(container["command"])
    assert commands == {"headwater-migrate": "migrate", "headwater-identity": "worker", "headwater-sink": "sink",
                        "headwater-capture": "capture"}


def test_references_between_resources_resolve():
    docs = k8s_resources()
    config_maps = {d["metadata"]["name"] for d in of_kind(docs, "ConfigMap")}
    operations = (ROOT / "docs" / "operations.md").read_text()
    for owner, container in containers(docs):
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps, owner
        for env in container.get("env", []):
            secret = env.get("valueFrom", {}).get("secretKeyRef")
            if secret:  # created by the operator, as docs/operations.md says
                assert f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}=" in operations
        ports = {p["name"] for p in container.get("ports", [])}
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports, owner
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    for d in deployments.values():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for service in of_kind(docs, "Service"):
        targets = [d for d in deployments.values()
                   if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_workers_scale_on_the_lag_of_their_own_consumer_group(monkeypatch):
    docs = k8s_resources()
    config = config_data()
    prefix = config["HEADWATER_TOPIC_PREFIX"]
    deployments = {d["metadata"]["name"]: d for d in of_kind(docs, "Deployment")}
    scaled = of_kind(docs, "ScaledObject")
    assert [s["spec"]["scaleTargetRef"]["name"] for s in scaled] == ["headwater-identity"]
    for so in scaled:
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        command = target["spec"]["template"]["spec"]["containers"][0]["command"]
        stage = next(s for s in STAGES if command[1:3] == ["worker", s.name])
        triggers = [t["metadata"] for t in so["spec"]["triggers"]]
        assert {t["consumerGroup"] for t in triggers} == {f"{prefix}{stage.group}"}
        assert {t["topic"] for t in triggers} == {spec.name(prefix) for spec in stage.inputs}
        assert {t["bootstrapServers"] for t in triggers} == {config["HEADWATER_KAFKA_BOOTSTRAP"]}
        partitions = min(spec.partitions or int(config["HEADWATER_PARTITIONS"]) for spec in stage.inputs)
        assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"] <= partitions


# -------------------------------------------------------------------------------------- the dashboard


def clickhouse_targets() -> list[tuple[str, str]]:
    return [(p["title"], t["rawSql"]) for p in dashboard()["panels"] for t in p["targets"] if "rawSql" in t]


def prometheus_targets() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"] if "expr" in t]


def test_dashboard_panels_use_the_provisioned_data_sources():
    provisioned = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "headwater.yaml").read_text())
    uids = {s["uid"]: s["type"] for s in provisioned["datasources"]}
    panels = dashboard()["panels"]
    assert {p["title"] for p in panels} >= {"Events per second", "Daily active users", "Daily active companies",
                                            "Signup funnel (persons, 14-day window)",
                                            "Ingestion lag (offsets behind, by consumer and topic)",
                                            "Dead letters per minute, by reason", "Dead letters by reason (ClickHouse)"}
    for panel in panels:
        for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert uids[source["uid"]] == source["type"], panel["title"]


def test_the_sql_in_compose_and_deploy_names_only_tables_of_the_migrations():
    texts = [COMPOSE_FILE.read_text(), (ROOT / "docs" / "operations.md").read_text()]
    texts += [p.read_text() for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".xml")]
    assert sum(len(_SQL_TABLE.findall(t)) for t in texts) >= 5  # the scan finds what is there
    for text in texts:
        assert unknown_tables(text) == set()


def test_a_table_missing_from_the_migrations_is_caught():
    assert unknown_tables("SELECT 1 FROM headwater.events JOIN headwater.evnets USING uuid") == {"evnets"}


#: Grafana's macros as the ClickHouse plugin expands them, for March 2024 and team 1.
_GRAFANA_MACROS = {"${team_id}": "1", "$__fromTime": "toDateTime('2024-03-01 00:00:00', 'UTC')",
                   "$__toTime": "toDateTime('2024-03-31 23:59:59', 'UTC')"}

_SAMPLE = [
    "INSERT INTO headwater.events (uuid, team_id, event, distinct_id, person_id, timestamp, `$group_0`) VALUES "
    "(generateUUIDv4(), 1, '$pageview', 'a', toUUID('00000000-0000-0000-0000-00000000000a'), '2024-03-05 10:00:00', 'acme'), "
    "(generateUUIDv4(), 1, 'signed_up', 'a', toUUID('00000000-0000-0000-0000-00000000000a'), '2024-03-05 10:05:00', 'acme'), "
    "(generateUUIDv4(), 1, 'project_created', 'a', toUUID('00000000-0000-0000-0000-00000000000a'), '2024-03-06 09:00:00', 'acme'), "
    "(generateUUIDv4(), 1, '$pageview', 'b', toUUID('00000000-0000-0000-0000-00000000000b'), '2024-03-05 11:00:00', ''), "
    "(generateUUIDv4(), 2, '$pageview', 'c', toUUID('00000000-0000-0000-0000-00000000000c'), '2024-03-05 11:00:00', '')",
    "INSERT INTO headwater.group_types (team_id, group_type, group_type_index) VALUES (1, 'company', 0)",
    "INSERT INTO headwater.events_dead_letter (reason, detail, stage, source_topic, source_partition, source_offset, "
    "dead_lettered_at, key, raw) VALUES ('invalid_json', 'x', 'identity', 'events_raw', 0, 7, '2024-03-10 00:00:00', 'k', '{')",
]


def test_the_dashboard_sql_runs_on_clickhouse_with_the_migrations():
    queries = []
    for title, sql in clickhouse_targets():
        for macro, value in _GRAFANA_MACROS.items():
            sql = sql.replace(macro, value)
        assert not re.search(r"\$__\w+|\$\{", sql), f"{title}: a Grafana macro the test does not expand"
        queries.append(sql)
    results = run_chdb(script("headwater") + _SAMPLE + queries)
    setup, answers = results[: -len(queries)], results[-len(queries):]
    assert [r for r in setup if "error" in r] == []
    titles = [title for title, _ in clickhouse_targets()]
    for title, answer in zip(titles, answers):
        assert "error" not in answer, f"{title}: {answer}"
    rows = dict(zip(titles, (a["rows"] for a in answers)))
    dau = {day: int(n) for day, n in rows["Daily active users"]}
    assert len(dau) == 31 and dau["2024-03-05"] == 2 and dau["2024-03-06"] == 1 and sum(dau.values()) == 3
    dac = {day: int(n) for day, n in rows["Daily active companies"]}
    assert len(dac) == 31 and dac["2024-03-05"] == 1 and dac["2024-03-06"] == 1 and sum(dac.values()) == 2
    funnel = [(int(step), event, int(persons)) for step, event, persons, *_ in rows["Signup funnel (persons, 14-day window)"]]
    assert funnel == [(1, "$pageview", 2), (2, "signed_up", 1), (3, "project_created", 1)]
    [dead] = rows["Dead letters by reason (ClickHouse)"]
    assert dead[:3] == ["invalid_json", "identity", "1"]


def metric_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every series name headwater/metrics.py exports -> (its metric, its label names)."""
    from prometheus_client.metrics import MetricWrapperBase

    from headwater import metrics

    out = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name, labels = value._name, tuple(value._labelnames)
            suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[value._type]
            out.update({name + s: (name, labels) for s in suffixes})
    return out


def test_the_dashboard_promql_names_metrics_and_labels_that_exist():
    families = metric_families()
    assert "headwater_consumer_lag_offsets" in families and "headwater_dead_letters_total" in families
    for title, expr in prometheus_targets():
        names = re.findall(r"\bheadwater_\w+", expr)
        assert names, title
        for name in names:
            assert name in families, f"{title}: {name} is not a metric of headwater/metrics.py"
            labels = set(re.findall(r"(\w+)\s*=~?\s*\"", expr)) | {
                label.strip() for group in re.findall(r"by\s*\(([^)]*)\)", expr) for label in group.split(",")}
            assert labels <= set(families[name][1]), f"{title}: {labels - set(families[name][1])} not labels of {name}"
