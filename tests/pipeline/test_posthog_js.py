"""The official posthog-js (from npm, pinned in tests/js/package.json) in headless Chromium (Debian's
``chromium``, no browser download), on test pages served from 127.0.0.1, sending to ``headwater
capture`` in front of the running pipeline; what lands in ClickHouse is checked:
- capture, identify, group, capture: one ``$session_id`` for the page, the anonymous id and
  ``user-1`` one person with the identify's properties, ``$groups``/``$group_0`` after ``group()``,
  the group row, ``$ip``, the sessions row;
- a page left before posthog-js's queue was flushed: the rest comes by ``sendBeacon`` and lands;
- posthog-js's defaults (flags and remote config on): 404 for those, and the events still land.

Each page turns off what would call anything but capture, unless the test is about it. posthog-js
needs a desktop user agent (it drops a HeadlessChrome's events as a bot's). The page reports
posthog-js's ids and every request error to the test's own server.

Skips only when Chromium is not installed or cannot start (``.ci/run`` installs it with apt-get).
posthog-js is installed from tests/js/package-lock.json with ``npm ci`` when it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest

from tests.conftest import ROOT, Pipeline, free_port, wait_until
from tests.pipeline.test_capture_endpoint import call

pytestmark = pytest.mark.pipeline

TOKEN = "phc_test"  # team 7 in the conftest's HEADWATER_TEAMS
JS_DIR = ROOT / "tests" / "js"
POSTHOG_JS = JS_DIR / "node_modules" / "posthog-js" / "dist" / "array.full.js"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps", "--mute-audio", "--no-default-browser-check",
    "--enable-logging=stderr", "--v=0",
    # a desktop Chrome's user agent: posthog-js drops the events of a "HeadlessChrome" one as a bot's
    "--user-agent=Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
]


def chromium_binary() -> str | None:
    for candidate in (os.environ.get("CHROME_BIN"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def chromium(tmp_path_factory) -> str:
    """Debian's Chromium, once shown to render a page headless; skip (with the reason) otherwise."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    profile = tmp_path_factory.mktemp("chromium-probe")
    try:
        probe = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                                "data:text/html,<p id=probe>chromium-renders</p>"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"Chromium at {binary} cannot start: {exc}")
    if "chromium-renders" not in probe.stdout:
        pytest.skip(f"Chromium at {binary} cannot render a page headless (exit {probe.returncode}): {probe.stderr[-500:]}")
    return binary


@pytest.fixture(scope="module")
def posthog_js() -> Path:
    """The pinned posthog-js build; ``npm ci`` in tests/js when it is not installed yet."""
    if not POSTHOG_JS.is_file():
        npm = shutil.which("npm")
        assert npm, "posthog-js is not installed and npm is missing: run `npm ci --prefix tests/js`"
        result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=JS_DIR,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"npm ci in tests/js failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    assert POSTHOG_JS.is_file(), POSTHOG_JS
    return POSTHOG_JS


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Pricing - headwater test shop</title>
<script src="/posthog-js/array.full.js"></script></head>
<body><h1>Pricing</h1>
<script>
const report = (kind, body) => fetch('/report', {method: 'POST', body: JSON.stringify({kind, ...body})});
window.addEventListener('error', (e) => report('page_error', {message: String(e.message)}));
posthog.init(%(token)s, Object.assign({
  api_host: %(api_host)s,
  // nothing but capture: no /flags or remote config, recordings, surveys, tours, toolbar or external scripts
  advanced_disable_flags: true,
  disable_session_recording: true,
  disable_surveys: true,
  disable_product_tours: true,
  disable_conversations: true,
  disable_web_experiments: true,
  disable_external_dependency_loading: true,
  autocapture: false,
  capture_pageview: true,
  capture_pageleave: false,
  capture_performance: false,
  capture_exceptions: false,
  capture_heatmaps: false,
  capture_dead_clicks: false,
  rageclick: false,
  request_batching: true,  // the default: events queued and sent together
  on_request_error: (response) => report('request_error', {status: response.statusCode, text: String(response.text || '')}),
  loaded: (ph) => {
%(actions)s
  },
}, %(options)s));
</script></body></html>
"""

#: capture, identify, group, capture; the queue flushed every 250 ms (3 s by default)
SIGN_UP = (
    {"request_queue_config": {"flush_interval_ms": 250}},
    """
    const anonymous = ph.get_distinct_id();
    ph.capture('viewed_pricing', {plan: 'pro', price: 49});
    ph.identify('user-1', {email: 'ada@example.com', name: 'Ada'}, {first_page: 'pricing'});
    ph.group('company', 'acme', {name: 'Acme Inc', employees: 42});
    ph.capture('clicked_signup', {button: 'hero'});
    report('called', {anonymous, distinct_id: ph.get_distinct_id(), session_id: ph.get_session_id(),
                      version: ph.version, groups: ph.getGroups()});
""")

#: posthog-js's defaults: it asks for its remote config (/array/<token>/config.js, then /config) and
#: feature flags (/flags), which capture does not serve (neither does PostHog's capture service)
DEFAULTS = (
    {"advanced_disable_flags": False, "disable_external_dependency_loading": False,
     "request_queue_config": {"flush_interval_ms": 250}},
    """
    ph.capture('viewed_home', {});
    ph.identify('user-2');
    report('called', {session_id: ph.get_session_id()});
""")

#: an event, then the page is left before the queue's next flush (5 s, the longest allowed): posthog-js
#: sends what is still queued, and $pageleave, with navigator.sendBeacon. Uncompressed, so its fetches are
#: JSON (CORS preflight first) and the beacon a form, `data=<base64>` with `?compression=base64`
LEAVE_EARLY = (
    {"request_queue_config": {"flush_interval_ms": 5000}, "capture_pageleave": True, "disable_compression": True},
    """
    ph.capture('read_pricing', {section: 'faq'});
    report('called', {anonymous: ph.get_distinct_id(), session_id: ph.get_session_id()})
      .then(() => { window.location.href = '/left'; });
""")


class ShopPage:
    """The test page, the posthog-js build and the page's reports, served on 127.0.0.1."""

    def __init__(self, api_host: str, posthog_js: Path, script: tuple[dict, str]) -> None:
        self.reports: list[dict] = []
        options, actions = script
        page = (PAGE % {"token": json.dumps(TOKEN), "api_host": json.dumps(api_host), "options": json.dumps(options),
                        "actions": actions}).encode()
        posthog_build = posthog_js.read_bytes()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/":
                    self._answer(200, page, "text/html; charset=utf-8")
                elif self.path == "/posthog-js/array.full.js":
                    self._answer(200, posthog_build, "application/javascript")
                elif self.path == "/left":
                    self._answer(200, b"<!doctype html><title>elsewhere</title><p>left", "text/html")
                else:
                    self._answer(404, b"not found", "text/plain")

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path == "/report":
                    site.reports.append(orjson.loads(body))
                self._answer(204, b"", "text/plain")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-site", daemon=True)

    def __enter__(self) -> ShopPage:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in list(self.reports) if r.get("kind") == kind]


def start_capture(pipeline: Pipeline) -> str:
    """``headwater capture`` as a process of the pipeline, on a free port; its base URL."""
    port = free_port()
    pipeline.env["HEADWATER_CAPTURE_ADDR"] = f"127.0.0.1:{port}"
    process = pipeline.start("capture", "capture")

    def listening() -> bool:
        try:
            return call(("127.0.0.1", port), "GET", "/_readiness").status == 200
        except OSError:
            return process.poll() is not None

    wait_until(listening, 30, message="capture listening")
    assert process.poll() is None, pipeline.log("capture")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def browser(chromium: str, tmp_path: Path) -> Iterator:
    """Opens a URL in a fresh headless Chromium (own profile, own process group); closed after."""
    opened: list[subprocess.Popen] = []
    logs: list[Path] = []

    def open_page(url: str) -> Path:
        log_path = tmp_path / f"chromium-{len(opened)}.log"
        with open(log_path, "wb") as log:
            opened.append(subprocess.Popen(
                [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / f'profile-{len(opened)}'}", url],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log_path)
        return log_path

    yield open_page
    for process in opened:  # the browser and its helpers share the process group it leads
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # helpers that outlived the browser
        except ProcessLookupError:
            pass


def run_page(script: tuple[dict, str], *, pipeline: Pipeline, clickhouse, db: str, posthog_js: Path, browser,
             expected_events: int, refusals: set[int] = frozenset()) -> tuple[str, dict, list[int]]:
    """Serve a page running ``script`` against a fresh ``headwater capture``, open it in Chromium, wait
    for its report and for ``expected_events`` rows in ClickHouse; the page's URL, its report and the
    error statuses posthog-js was answered: each in ``refusals``, and at least one if ``refusals``."""
    api_host = start_capture(pipeline)
    with ShopPage(api_host, posthog_js, script) as site:
        chromium_log = browser(site.url)

        def why() -> str:
            return (f"page reports {site.reports}\nchromium: {chromium_log.read_text(errors='replace')[-3000:]}\n"
                    f"capture: {pipeline.log('capture')[-3000:]}")

        def landed() -> bool:
            return clickhouse.query(f"SELECT count() FROM {db}.events").result_rows[0][0] >= expected_events

        try:
            wait_until(lambda: site.of_kind("called") or site.of_kind("page_error"), 60, message="the page to report")
            assert site.of_kind("page_error") == []
            wait_until(landed, 90, message=f"{expected_events} events of posthog-js in ClickHouse")
            if refusals:
                wait_until(lambda: site.of_kind("request_error"), 30, message="the refusals the test expects")
        except (AssertionError, pytest.fail.Exception) as exc:
            pytest.fail(f"{exc}\n{why()}")
        # capture never refused posthog-js, nor lacked a path it called (unless the test expects it)
        assert {r["status"] for r in site.of_kind("request_error")} <= refusals, why()
        [page] = site.of_kind("called")
        return site.url, page, [r["status"] for r in site.of_kind("request_error")]


SIGN_UP_EVENTS = ["$pageview", "viewed_pricing", "$identify", "$groupidentify", "clicked_signup"]


def test_posthog_js_capture_identify_group_land_with_session_person_and_group(chromium, posthog_js, settings, pipeline,
                                                                               clickhouse, browser):
    db = settings.clickhouse.database
    url, page, _ = run_page(SIGN_UP, pipeline=pipeline, clickhouse=clickhouse, db=db, posthog_js=posthog_js, browser=browser,
                         expected_events=len(SIGN_UP_EVENTS))
    anonymous, session_id = page["anonymous"], page["session_id"]
    assert page["distinct_id"] == "user-1" and anonymous != "user-1" and session_id
    assert page["groups"] == {"company": "acme"}
    rows = clickhouse.query(
        f"SELECT event, distinct_id, toString(person_id), `$session_id`, `$window_id`, properties, person_properties, "
        f"`$group_0`, group0_properties FROM {db}.events ORDER BY timestamp, event").result_rows
    events = {r[0]: dict(zip(("event", "distinct_id", "person_id", "session_id", "window_id", "properties",
                              "person_properties", "group_0", "group0_properties"), r)) for r in rows}
    assert sorted(events) == sorted(SIGN_UP_EVENTS), [r[0] for r in rows]
    assert len(rows) == len(SIGN_UP_EVENTS)
    for e in events.values():
        e["properties"] = orjson.loads(e["properties"])
        e["person_properties"] = orjson.loads(e["person_properties"])

    # one session for the page: posthog-js's $session_id (a UUIDv7) on every event, and one window
    assert {e["session_id"] for e in events.values()} == {session_id} and uuid.UUID(session_id).version == 7
    assert len({e["window_id"] for e in events.values()}) == 1 and events["$pageview"]["window_id"]
    assert events["viewed_pricing"]["properties"]["$lib"] == "web"
    assert events["viewed_pricing"]["properties"]["$lib_version"] == page["version"]
    assert events["viewed_pricing"]["properties"]["plan"] == "pro"
    assert events["viewed_pricing"]["properties"]["$browser"] == "Chrome"
    assert events["$pageview"]["properties"]["$current_url"] == url
    # the client ip that capture saw became $ip, as PostHog's ingestion does
    assert {e["properties"].get("$ip") for e in events.values()} == {"127.0.0.1"}

    # identify: the anonymous id and user-1 are one person, with the identify's properties
    assert events["viewed_pricing"]["distinct_id"] == anonymous
    assert events["$identify"]["distinct_id"] == "user-1"
    assert events["$identify"]["properties"]["$anon_distinct_id"] == anonymous
    pdi = dict(clickhouse.query(
        f"SELECT distinct_id, toString(argMax(person_id, version)) FROM {db}.person_distinct_ids "
        f"WHERE team_id = 7 GROUP BY distinct_id HAVING argMax(is_deleted, version) = 0").result_rows)
    assert set(pdi) == {anonymous, "user-1"} and pdi[anonymous] == pdi["user-1"]
    person_id = pdi["user-1"]
    assert events["clicked_signup"]["person_id"] == person_id
    assert {e["person_id"] for e in events.values() if e["event"] != "viewed_pricing"} == {person_id}
    corrected = dict(clickhouse.query(f"SELECT event, toString(person_id) FROM {db}.events_with_person").result_rows)
    assert set(corrected.values()) == {person_id}  # the anonymous event too, through person_overrides
    [(properties, identified)] = clickhouse.query(
        f"SELECT properties, is_identified FROM {db}.persons_latest WHERE team_id = 7 AND toString(id) = {{p:String}}",
        parameters={"p": person_id}).result_rows
    properties = orjson.loads(properties)
    assert identified == 1
    assert (properties["email"], properties["name"], properties["first_page"]) == ("ada@example.com", "Ada", "pricing")
    assert events["clicked_signup"]["person_properties"]["email"] == "ada@example.com"

    # group(): $groups on every later event, slot 0 for the team's first group type, the group's row
    assert "$groups" not in events["viewed_pricing"]["properties"] and events["viewed_pricing"]["group_0"] == ""
    assert events["clicked_signup"]["properties"]["$groups"] == {"company": "acme"}
    assert events["clicked_signup"]["group_0"] == "acme"
    assert orjson.loads(events["clicked_signup"]["group0_properties"]) == {"name": "Acme Inc", "employees": 42}
    assert events["$groupidentify"]["properties"]["$group_type"] == "company"
    assert clickhouse.query(f"SELECT group_type, group_type_index FROM {db}.group_types WHERE team_id = 7").result_rows == [
        ("company", 0)]
    [(group_properties,)] = clickhouse.query(
        f"SELECT argMax(group_properties, version) FROM {db}.groups WHERE team_id = 7 AND group_type_index = 0 "
        f"AND group_key = 'acme' GROUP BY group_key").result_rows
    assert orjson.loads(group_properties) == {"name": "Acme Inc", "employees": 42}

    # the sessions table has the page's session, entered on the test page
    def session_row():
        return clickhouse.query(f"SELECT entry_url, pageviews, events FROM {db}.sessions WHERE session_id = {{s:String}}",
                                parameters={"s": session_id}).result_rows
    assert wait_until(session_row, 30, message="the session row") == [(url, 1, len(SIGN_UP_EVENTS))]


def test_events_queued_when_the_page_is_left_are_sent_by_beacon_and_land(chromium, posthog_js, settings, pipeline,
                                                                          clickhouse, browser):
    db = settings.clickhouse.database
    url, page, _ = run_page(LEAVE_EARLY, pipeline=pipeline, clickhouse=clickhouse, db=db, posthog_js=posthog_js,
                         browser=browser, expected_events=3)
    rows = clickhouse.query(f"SELECT event, distinct_id, `$session_id`, properties FROM {db}.events").result_rows
    assert sorted(r[0] for r in rows) == ["$pageleave", "$pageview", "read_pricing"]
    assert {(r[1], r[2]) for r in rows} == {(page["anonymous"], page["session_id"])}
    read = next(orjson.loads(r[3]) for r in rows if r[0] == "read_pricing")
    assert read["section"] == "faq" and read["$current_url"] == url and read["$ip"] == "127.0.0.1"


def test_posthog_js_with_flags_and_remote_config_on_gets_404_for_them_and_still_captures(chromium, posthog_js, settings,
                                                                                          pipeline, clickhouse, browser):
    db = settings.clickhouse.database
    _, page, refused = run_page(DEFAULTS, pipeline=pipeline, clickhouse=clickhouse, db=db, posthog_js=posthog_js,
                                browser=browser, expected_events=3, refusals={404})
    assert refused and set(refused) == {404}  # posthog-js did ask for flags and config, and was told 404
    rows = clickhouse.query(f"SELECT event, distinct_id, `$session_id` FROM {db}.events").result_rows
    assert sorted(r[0] for r in rows) == ["$identify", "$pageview", "viewed_home"]
    assert {r[2] for r in rows} == {page["session_id"]}
    assert {r[1] for r in rows if r[0] == "$identify"} == {"user-2"}
