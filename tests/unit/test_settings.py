import pytest
from pydantic import ValidationError

from headwater.settings import ClickHouseTarget, Settings, parse_teams


def test_defaults_are_the_embedded_mode(monkeypatch):
    for key in ("HEADWATER_KAFKA_BOOTSTRAP", "HEADWATER_CLICKHOUSE_URL", "HEADWATER_TEAMS", "HEADWATER_CAPTURE_ADDR"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert s.embedded_kafka and s.embedded_clickhouse
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert (s.clickhouse.host, s.clickhouse.port, s.clickhouse.database) == ("127.0.0.1", 8123, "headwater")
    assert s.team_by_token == {"phc_local": 1}
    assert s.capture_host_port == ("127.0.0.1", 8000)


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("HEADWATER_KAFKA_BOOTSTRAP", "kafka:29092")
    monkeypatch.setenv("HEADWATER_CLICKHOUSE_URL", "https://ana:s%40cret@ch.example:9443/analytics")
    monkeypatch.setenv("HEADWATER_TEAMS", "phc_a:1, phc_b:2")
    monkeypatch.setenv("HEADWATER_KAFKA_SASL_PASSWORD", "pw")
    monkeypatch.setenv("HEADWATER_KAFKA_EXTRA", '{"client.rack": "r1"}')
    s = Settings()
    target = s.clickhouse
    assert (target.secure, target.host, target.port, target.username, target.password, target.database) == (
        True, "ch.example", 9443, "ana", "s@cret", "analytics")
    assert s.team_by_token == {"phc_a": 1, "phc_b": 2}
    config = s.kafka_config()
    assert config["bootstrap.servers"] == "kafka:29092"
    assert config["sasl.password"] == "pw" and config["client.rack"] == "r1"
    assert "pw" not in repr(s)


@pytest.mark.parametrize("spec", ["", "phc", "phc:x", ":1", "a:1,a:2"])
def test_bad_teams_are_refused(spec):
    with pytest.raises(ValueError):
        parse_teams(spec)


@pytest.mark.parametrize("url", ["ftp://x/db", "http:///db", "http://h:8123/bad-name;drop"])
def test_bad_clickhouse_urls_are_refused(url):
    with pytest.raises(ValueError):
        ClickHouseTarget(url, "headwater")


def test_identifiers_from_configuration_are_validated(monkeypatch):
    monkeypatch.setenv("HEADWATER_CLICKHOUSE_DATABASE", "x; DROP TABLE y")
    with pytest.raises(ValidationError):
        Settings()


def test_a_team_gets_one_token_because_identity_state_is_homed_by_it():
    with pytest.raises(ValueError, match="second token"):
        parse_teams("phc_a:1,phc_b:1")


def test_personless_teams_are_team_ids(monkeypatch):
    monkeypatch.setenv("HEADWATER_PERSONLESS_TEAMS", "3, 5")
    assert Settings().personless_team_ids == frozenset({3, 5})
    monkeypatch.setenv("HEADWATER_PERSONLESS_TEAMS", "acme")
    with pytest.raises(ValidationError):
        Settings()


def test_consumers_read_uncommitted_on_the_embedded_broker_and_committed_on_a_cluster(monkeypatch):
    monkeypatch.delenv("HEADWATER_KAFKA_ISOLATION_LEVEL", raising=False)
    monkeypatch.delenv("HEADWATER_KAFKA_BOOTSTRAP", raising=False)
    assert Settings().consumer_config("g")["isolation.level"] == "read_uncommitted"  # Tansu: ADR 0015
    assert Settings().tansu_workarounds
    monkeypatch.setenv("HEADWATER_KAFKA_BOOTSTRAP", "kafka:29092")
    assert Settings().consumer_config("g")["isolation.level"] == "read_committed"
    assert not Settings().tansu_workarounds
    monkeypatch.setenv("HEADWATER_KAFKA_ISOLATION_LEVEL", "read_uncommitted")  # a Tansu the stack did not start
    assert Settings().isolation_level == "read_uncommitted"
    assert Settings().tansu_workarounds
    monkeypatch.setenv("HEADWATER_KAFKA_ISOLATION_LEVEL", "read_dirty")
    with pytest.raises(ValidationError):
        Settings()
