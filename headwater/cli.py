"""The ``headwater`` command line. Settings are built here, once, and passed down."""

from __future__ import annotations

import ast
import faulthandler
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .settings import Settings

if TYPE_CHECKING:
    from .stack import LocalStack

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="headwater: Kafka-native product analytics ingestion (PostHog semantics) into ClickHouse.\n\n"
    "Configuration comes from HEADWATER_* environment variables; see the README.",
)


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        typer.echo(f"headwater: invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from None


LOG_FORMATS = ("text", "json")


@app.callback()
def _options(
    log_format: str = typer.Option(
        "text", "--log-format", envvar="HEADWATER_LOG_FORMAT", metavar="text|json",
        help="Log lines as text, or as one JSON object per line (ts, level, logger, message; exc for errors). "
        "Processes started by up and demo inherit it.",
    ),
) -> None:
    if log_format not in LOG_FORMATS:
        raise typer.BadParameter(f"{log_format!r} is not one of {', '.join(LOG_FORMATS)}", param_hint="--log-format")
    os.environ["HEADWATER_LOG_FORMAT"] = log_format  # for the children of up and demo


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line: ``ts`` (UTC), ``level``, ``logger``, ``message``, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import datetime, timezone

        line = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("HEADWATER_LOG_FORMAT") == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a component stops between batches."""
    stop = threading.Event()

    def handler(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    # `kill -USR1 <pid>` prints every thread's Python stack to stderr: a stuck component can be
    # read without a debugger (the fault tests' diagnostics do it when py-spy is missing)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return stop


@app.command()
def up(
    workers: int = typer.Option(1, min=1, help="Identity worker processes to run."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the whole pipeline in the foreground (embedded broker and ClickHouse when none are
    configured, identity workers, sink, and the capture endpoint on HEADWATER_CAPTURE_ADDR).
    Ctrl-C stops everything cleanly."""
    from .status import run_until_stopped

    _logging(verbose)
    settings = _settings()
    stop = _stop_event()
    with _running_stack("up", settings, workers) as stack:
        typer.echo(_banner(settings), err=True)
        run_until_stopped(stack, settings, stop)


@contextmanager
def _running_stack(command: str, settings: Settings, workers: int = 1) -> Iterator["LocalStack"]:
    """Start the local stack; stop every child on the way out, whatever happened."""
    from .stack import LocalStack, StackError

    stack = LocalStack(settings, workers=workers)
    try:
        stack.start()
        yield stack
    except StackError as exc:
        typer.echo(f"headwater {command}: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        typer.echo("\nheadwater: stopping...", err=True)
        stack.stop()
        typer.echo("headwater: stopped.", err=True)


def _banner(settings: Settings) -> str:
    ch = settings.clickhouse
    kafka = "embedded Tansu (memory storage)" if settings.embedded_kafka else "configured cluster"
    clickhouse = "embedded chDB" if settings.embedded_clickhouse else "configured server"
    host, port = settings.capture_host_port
    capture = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    token = next(iter(settings.team_by_token), "phc_local")
    return (
        f"headwater is up.\n"
        f"  Kafka       {settings.bootstrap_servers}  ({kafka})\n"
        f"  ClickHouse  http://{ch.host}:{ch.port}  database {ch.database}  ({clickhouse})\n"
        f"  Capture     {capture}  (PostHog's capture API: posthog-js api_host, posthog-python host; "
        f"tokens {', '.join(settings.team_by_token)})\n"
        f"  Send: curl -s {capture}/batch/ -d '{{\"api_key\": \"{token}\", \"batch\": "
        f"[{{\"event\": \"hello\", \"distinct_id\": \"me\"}}]}}'\n"
        f"  Try:  headwater sql \"SELECT event, count() FROM {ch.database}.events GROUP BY event\"\n"
        f"  Ctrl-C to stop."
    )


@app.command()
def demo(
    users: int = typer.Option(400, min=10, help="Simulated visitors."),
    companies: int = typer.Option(20, min=1, help="Simulated customer companies."),
    report: Optional[Path] = typer.Option(None, "--report", help="Where to write the HTML report [default: DATA_DIR/demo-report.html, i.e. .headwater/demo-report.html]."),
    keep_running: bool = typer.Option(False, help="Keep the stack up after the report."),
    send_only: bool = typer.Option(
        False, "--send-only",
        help="Only send the simulated weeks to the configured Kafka (HEADWATER_KAFKA_BOOTSTRAP) and exit: no stack, "
        "no report. For a pipeline that runs elsewhere, e.g. the demo service of docker compose. Exit 1 when an "
        "event was not acknowledged.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start the stack, simulate four weeks of a SaaS product, write an HTML report of the analyst's
    charts (drawn from ClickHouse queries) and print a short summary."""
    from .demo import run_demo, send_demo_events
    from .status import run_until_stopped

    _logging(verbose)
    settings = _settings()
    if send_only:
        if report is not None or keep_running:
            typer.echo("headwater demo: --send-only starts no stack and writes no report (drop --report, --keep-running)", err=True)
            raise typer.Exit(2)
        raise typer.Exit(send_demo_events(settings, users=users, companies=companies))
    stop = _stop_event()
    report_path = report if report is not None else Path(settings.data_dir) / "demo-report.html"
    with _running_stack("demo", settings) as stack:
        run_demo(settings, stack, users=users, companies=companies, stop=stop, report_path=report_path)
        if keep_running:
            typer.echo(_banner(settings), err=True)
            run_until_stopped(stack, settings, stop)


def _param_value(text: str) -> object:
    """A --param value: ``['a','b']`` / ``[1,2]`` become lists (for ``Array(...)`` parameters);
    everything else stays text, which ClickHouse parses into the parameter's declared type."""
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise typer.BadParameter(f"{text!r} looks like an array but is not one (write ['a','b'])") from None
        if isinstance(value, list):
            return value
    return text


@app.command()
def sql(
    query: Optional[str] = typer.Argument(None, help="The SQL to run (or use --file)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Read the SQL from this file (a docs/sql/ query: its `headwater.` database becomes the configured one)."),
    param: list[str] = typer.Option([], "--param", "-p", help="A query parameter NAME=VALUE for {NAME:Type} in the SQL; repeatable."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | tsv | json"),
) -> None:
    """Run SQL against the configured ClickHouse and print the result."""
    from clickhouse_connect.driver.exceptions import ClickHouseError

    from sinks.clickhouse.client import connect

    from .tables import render

    if (query is None) == (file is None):
        typer.echo("headwater sql: give either the SQL or --file FILE", err=True)
        raise typer.Exit(2)
    settings = _settings()
    if file is not None:  # cookbook files name the default database; run them against the configured one
        query = re.sub(r"\bheadwater\.", f"{settings.clickhouse.database}.", file.read_text())
    parameters = {}
    for item in param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            typer.echo(f"headwater sql: --param takes NAME=VALUE, not {item!r}", err=True)
            raise typer.Exit(2)
        parameters[name] = _param_value(value)
    target = settings.clickhouse
    try:
        client = connect(target)
    except (ClickHouseError, OSError) as exc:
        typer.echo(f"headwater sql: cannot reach ClickHouse at {target.display}: {str(exc).splitlines()[0]}", err=True)
        if settings.embedded_clickhouse:
            typer.echo("Is `headwater up` running? (or set HEADWATER_CLICKHOUSE_URL)", err=True)
        raise typer.Exit(1) from None
    try:
        result = client.query(query, parameters=parameters or None)
    except ClickHouseError as exc:
        typer.echo(str(exc).strip(), err=True)
        raise typer.Exit(1) from None
    typer.echo(render(result.column_names, result.result_rows, fmt))


@app.command()
def status(
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object (for scripts)."),
    interval: float = typer.Option(
        2.0, min=0.0, help="Seconds between the two reads of committed offsets that give throughput; 0: no throughput."
    ),
) -> None:
    """Per stage and partition: consumer lag and throughput; dead letters and warnings by reason in
    the last hour; rows per table; whether Kafka and ClickHouse answer. Exit status 1 when either
    does not."""
    import json

    from .status import collect_status, render_status

    settings = _settings()
    report = collect_status(settings, interval=interval)
    typer.echo(json.dumps(report) if as_json else render_status(report))
    if not (report["broker"]["reachable"] and report["clickhouse"]["reachable"]):
        raise typer.Exit(1)


@app.command()
def topics(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Create the declared topics that are missing and check the others (idempotent)."""
    from .kafka_admin import ensure_topics

    if verbose:
        _logging(True)
    settings = _settings()
    statuses = ensure_topics(settings)
    for status in statuses:
        typer.echo(f"{status.state:9} {status.name:32} {status.detail}")
    if any(s.state == "mismatch" for s in statuses):
        raise typer.Exit(1)
    if all(s.state == "ok" for s in statuses):
        typer.echo("all topics in place")


@app.command()
def migrate(
    print_sql: bool = typer.Option(
        False, "--print",
        help="Print the SQL instead of running it (connects to nothing): every statement this command would "
        "run on an empty database, recording of each migration included, separated by blank lines.",
    ),
    cluster: Optional[str] = typer.Option(
        None, "--cluster", metavar="NAME",
        help="With --print: render for this ClickHouse cluster (ON CLUSTER, Replicated local tables behind "
        "Distributed ones; ADR 0008) instead of HEADWATER_CLICKHOUSE_CLUSTER.",
    ),
) -> None:
    """Apply the ClickHouse migrations that are not applied yet (idempotent), or print them (--print)
    to review or apply by hand. The database is HEADWATER_CLICKHOUSE_URL's; cluster mode is
    HEADWATER_CLICKHOUSE_CLUSTER."""
    from sinks.clickhouse.migrate import script

    if cluster is not None and not print_sql:
        typer.echo("headwater migrate: --cluster goes with --print; to apply for a cluster, set "
                   "HEADWATER_CLICKHOUSE_CLUSTER (the sink applies migrations with it too)", err=True)
        raise typer.Exit(2)
    settings = _settings()
    if print_sql:
        if cluster is not None:
            try:
                settings = Settings(clickhouse_cluster=cluster)
            except ValueError:
                typer.echo(f"headwater migrate: --cluster {cluster!r} is not a plain identifier", err=True)
                raise typer.Exit(2) from None
        statements = script(settings.clickhouse.database, settings.clickhouse_cluster)
        typer.echo(";\n\n".join(statements) + ";")
        return

    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations

    client = connect(settings.clickhouse)
    applied = apply_migrations(client, settings.clickhouse.database, settings.clickhouse_cluster)
    typer.echo("applied: " + (", ".join(applied) if applied else "nothing, schema is up to date"))


@app.command()
def manifests(
    check: bool = typer.Option(
        False, "--check", help="Write nothing; list the files that differ from what would be generated and exit 1 if any does."
    ),
) -> None:
    """Regenerate the deploy files derived from the code, in this source checkout: the Strimzi
    KafkaTopics of the topic declarations, the ClickHouse cluster schema of the migrations, and the
    Grafana dashboard of the SQL cookbook (docs/adr/0014-deployment.md)."""
    from .deploy import generated_files

    try:
        files = generated_files()
    except FileNotFoundError as exc:
        typer.echo(f"headwater manifests: {exc}", err=True)
        raise typer.Exit(2) from None
    stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(files[path])
        typer.echo(f"{'differs' if check else 'wrote'}  {path}")
    if check and stale:
        raise typer.Exit(1)
    if not stale:
        typer.echo("every generated file is up to date")


@app.command()
def worker(
    stage: str = typer.Argument(..., help="Stage to run: identity"),
    worker_id: str = typer.Option("0", help="Id of this worker, distinct per worker process: in its Kafka client ids and its local state folder (transactional ids are per partition)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one processor stage (scale out by starting more, each with its own --worker-id)."""
    from headwater import allocator
    from processors.identity.worker import identity_runner

    allocator.limit_arenas()  # before any Kafka client or RocksDB starts its threads (ADR 0016)
    _logging(verbose)
    settings = _settings()
    if stage != "identity":
        typer.echo(f"unknown stage {stage!r}; stages: identity", err=True)
        raise typer.Exit(2)
    runner = identity_runner(settings, worker_id)
    runner.run(_stop_event())


@app.command()
def sink(
    worker_id: str = typer.Option("0", help="Id of this sink process (for logs)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the ClickHouse sink (applies migrations first)."""
    from sinks.clickhouse.client import connect
    from sinks.clickhouse.migrate import apply_migrations
    from sinks.clickhouse.sink import ClickHouseSink

    _logging(verbose)
    settings = _settings()
    client = connect(settings.clickhouse, form_encode_query_params=True)  # uuid lookups: big parameters
    apply_migrations(client, settings.clickhouse.database, settings.clickhouse_cluster)
    ClickHouseSink(settings, client, worker_id=worker_id).run(_stop_event())


@app.command()
def capture(
    delivery_timeout: float = typer.Option(
        10.0, min=0.5, help="Seconds Kafka has to acknowledge a request's events before it is answered 503."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve the PostHog-compatible capture HTTP API (/e, /i/v0/e, /capture, /batch, ...) on
    HEADWATER_CAPTURE_ADDR; each request is answered after Kafka acknowledged its events."""
    from producers.capture import serve

    _logging(verbose)
    settings = _settings()
    try:
        serve(settings, delivery_timeout_s=delivery_timeout)
    except OSError as exc:
        typer.echo(f"headwater capture: cannot listen on {settings.capture_addr}: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command(
    help="Send events to events_raw, one JSON object per line in the events_raw envelope (token, distinct_id, "
    "event, and optionally uuid, timestamp, properties, $set, $set_once). Blank lines are skipped. A line without "
    "uuid gets a new one; a line without timestamp happened now; timestamps are written in UTC. Each line's token "
    "must be in HEADWATER_TEAMS.\n\n"
    "Each bad line and each failed delivery is reported on stderr with its line number. The command waits for "
    "Kafka to acknowledge every event, then prints 'sent N, failed N, bad lines N'. Ctrl-C stops reading; what "
    "was read is still sent and counted.\n\n"
    "Exit status: 0 when every line was sent; 1 when a line was bad, a delivery failed, Kafka or the topic is "
    "missing, or the command was interrupted; 2 for a usage error."
)
def send(
    file: Optional[str] = typer.Argument(
        None, metavar="FILE.jsonl", help="JSON Lines file, one event per line; '-' or nothing reads stdin."
    ),
    token: Optional[str] = typer.Option(
        None, help="Project token for lines that carry none (a line's own token wins); must be in HEADWATER_TEAMS."
    ),
    delivery_timeout: float = typer.Option(
        30.0, min=1.0, help="Seconds Kafka has to acknowledge each event before it counts as failed."
    ),
) -> None:
    from producers.send import run_send

    # Ctrl-C (SIGINT) must stop the reading, as documented, also when the command inherited SIGINT
    # ignored: a shell without job control starts `cmd &` so, and Python then installs no handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings = _settings()
    raise typer.Exit(run_send(settings, file, token=token, delivery_timeout_s=delivery_timeout))


@app.command()
def schema(
    write: Optional[Path] = typer.Option(None, help="Write the JSON Schema to this file instead of printing it."),
) -> None:
    """Print the JSON Schema of the events_raw envelope (what other services produce)."""
    import json

    from .wire import raw_event_json_schema

    text = json.dumps(raw_event_json_schema(), indent=2, sort_keys=True) + "\n"
    if write is None:
        typer.echo(text, nl=False)
    else:
        write.write_text(text)


@app.command("clickhouse")
def clickhouse_server(
    data_dir: Optional[Path] = typer.Option(None, help="chDB data folder (default: HEADWATER_DATA_DIR/chdb)."),
    port: Optional[int] = typer.Option(None, help="Port (default: HEADWATER_EMBEDDED_CLICKHOUSE_PORT)."),
) -> None:
    """Serve only the embedded ClickHouse (chDB behind the ClickHouse HTTP interface)."""
    from .embedded.clickhouse_http import serve_forever

    _logging()
    settings = _settings()
    folder = data_dir or Path(settings.data_dir) / "chdb"
    folder.mkdir(parents=True, exist_ok=True)
    serve_forever(str(folder), "127.0.0.1", port or settings.embedded_clickhouse_port)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
