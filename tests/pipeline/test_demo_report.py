"""The demo's HTML report, on the demo's own story sent through the real pipeline:
- its numbers: every chart's drawn elements carry the numbers recounted here from the events the
  demo sent (daily active users and companies, the funnel, retention), by plain loops;
- self-contained: no script, nothing fetched;
- drawn: headless Chromium (Debian's, found as tests/pipeline/test_posthog_js.py finds it) renders
  it: the screenshot is a PNG with the charts' colours in it, and the DOM has the five titles.
Skips the Chromium part only when Chromium is missing or cannot start.
"""

from __future__ import annotations

import re
import struct
import subprocess
import zlib
from collections import Counter, defaultdict
from datetime import date, timedelta
from html.parser import HTMLParser

import pytest

from headwater.demo import Sent, Workload, _send_workload, landed
from headwater.report import FUNNEL_WINDOW_S, RETENTION_WEEKS, TITLES, ReportData, collect, render_html, write_report
from producers.backend import Client
from tests.conftest import wait_until
from tests.pipeline.test_posthog_js import CHROMIUM_FLAGS, chromium  # noqa: F401 (the fixture)

TOKEN, TEAM = "phc_test", 7  # the conftest's HEADWATER_TEAMS
BLUE, GREEN = bytes.fromhex("2f6fdf"), bytes.fromhex("13a07d")  # the report's bar colours


class Charts(HTMLParser):
    """The report's h2 titles, and per section id the ``data-value`` of its drawn elements by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.section, self.in_h2 = "", False
        self.titles: list[str] = []
        self.values: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.polylines: dict[str, int] = Counter()
        self.tags: Counter = Counter()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        if tag == "section":
            self.section = attrs["id"]
        elif tag == "h2":
            self.in_h2 = True
        elif "data-value" in attrs:
            self.values[(self.section, f"{tag}.{attrs['class']}")].append(int(attrs["data-value"]))
        elif tag == "polyline":
            self.polylines[self.section] += len(attrs["points"].split())

    def handle_endtag(self, tag):
        self.in_h2 = self.in_h2 and tag != "h2"

    def handle_data(self, text):
        if self.in_h2:
            self.titles.append(text)


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def expected_daily(sent: list[Sent], first: date, last: date, of) -> list[int]:
    """Per day, how many distinct ``of(event)`` (not '') among events other than $groupidentify."""
    seen: dict[date, set] = defaultdict(set)
    for s in sent:
        if s.event != "$groupidentify" and of(s):
            seen[s.timestamp.date()].add(of(s))
    return [len(seen[d]) for d in days(first, last)]


def expected_funnel(sent: list[Sent], steps: list[str]) -> list[int]:
    """Persons per step reached in order within the window, windowFunnel's way, by plain loops."""
    by_person: dict[str, list[Sent]] = defaultdict(list)
    for s in sent:
        by_person[s.person].append(s)
    reached = [0] * len(steps)
    window = timedelta(seconds=FUNNEL_WINDOW_S)
    for events in by_person.values():
        events.sort(key=lambda s: s.timestamp)
        best = 0
        for start in (s for s in events if s.event == steps[0]):
            level, at = 1, start.timestamp
            for step in steps[1:]:
                nxt = next((s.timestamp for s in events if s.event == step and at <= s.timestamp <= start.timestamp + window), None)
                if nxt is None:
                    break
                level, at = level + 1, nxt
            best = max(best, level)
        for k in range(best):
            reached[k] += 1
    return reached


def expected_retention(sent: list[Sent], last: date) -> dict[tuple[date, int], tuple[int, int]]:
    """(cohort week, offset) -> (cohort size, returned): cohort = ISO week of the first signed_up,
    returned = did a $pageview in the week cohort + offset (offsets up to RETENTION_WEEKS and to last's week)."""
    def monday(d: date) -> date:
        return d - timedelta(days=d.weekday())

    cohort: dict[str, date] = {}
    active: dict[str, set[date]] = defaultdict(set)
    for s in sorted(sent, key=lambda s: s.timestamp):
        if s.event == "signed_up":
            cohort.setdefault(s.person, monday(s.timestamp.date()))
        if s.event == "$pageview":
            active[s.person].add(monday(s.timestamp.date()))
    table: dict[tuple[date, int], list[int]] = defaultdict(lambda: [0, 0])
    for person, week in cohort.items():
        for offset in range(min(RETENTION_WEEKS, (monday(last) - week).days // 7) + 1):
            table[(week, offset)][0] += 1
            table[(week, offset)][1] += (week + timedelta(weeks=offset)) in active[person]
    return {key: tuple(value) for key, value in table.items()}


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and rows (RGB or RGBA bytes) of an 8-bit non-interlaced PNG, filters undone."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, bytearray()
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
        elif kind == b"IDAT":
            idat += body
    bpp = 3 if colour == 2 else 4
    stride, raw = width * bpp, zlib.decompress(bytes(idat))
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:  # Up
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous))
        elif kind == 3:  # Average
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + previous[i]) // 2) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), previous[i], (previous[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, [bytes(b"".join(r[i:i + 3] for i in range(0, len(r), bpp))) if bpp == 4 else r for r in rows]


def send_story(settings, clickhouse) -> Workload:
    client = Client.from_settings(settings, TOKEN)
    work = _send_workload(client, users=60, companies=6, seed=11)
    client.close()
    db = settings.clickhouse.database
    wait_until(lambda: landed(clickhouse, db, TEAM, work, 0, 0)[1], 90, interval=0.3,
               message=f"the demo's {work.events} events, merges and plans in ClickHouse")
    assert clickhouse.query(f"SELECT count() FROM {db}.events_dead_letter").result_rows == [(0,)]
    return work


@pytest.mark.pipeline
def test_demo_report_draws_the_numbers_of_what_was_sent_and_chromium_renders_it(pipeline, settings, clickhouse, tmp_path, request):
    work = send_story(settings, clickhouse)
    first, last = work.start.date(), work.end.date()
    data = collect(clickhouse, settings.clickhouse.database, team_id=TEAM, date_from=first, date_to=last)
    path = write_report(data, tmp_path / "report" / "demo-report.html")
    page = path.read_text()
    charts = Charts()
    charts.feed(page)

    assert charts.titles == list(TITLES)
    # self-contained: no script, no stylesheet or image or font fetched from anywhere
    assert charts.tags["script"] == 0 and not re.search(r"""\b(src|href)\s*=|@import|url\(""", page)
    assert charts.tags["svg"] == 5

    # daily active users: one point per day, each the persons recounted here (merged visitors once)
    dau = expected_daily(work.sent, first, last, lambda s: s.person)
    assert [n for _, n in data.dau] == dau and max(dau) >= 5 and len(set(dau)) > 3
    assert charts.values[("dau", "circle.point")] == dau and charts.polylines["dau"] == len(dau)
    # a visitor who logged in on other devices counts once: fewer persons than distinct ids
    assert data.persons == 60 < data.distinct_ids

    # daily active companies: one bar per day
    dac = expected_daily(work.sent, first, last, lambda s: s.company)
    assert [n for _, n in data.dac] == dac and max(dac) >= 2
    assert charts.values[("dac", "rect.bar")] == dac

    # the funnel: every visitor, then those who signed up, then those who created a project in time
    funnel = expected_funnel(work.sent, ["$pageview", "signed_up", "project_created"])
    assert funnel[0] == 60 > funnel[1] > funnel[2] > 0
    assert charts.values[("funnel", "rect.bar")] == funnel == [persons for _, _, persons, _, _ in data.funnel]

    # weekly retention: one cell per (cohort, week offset), the persons who came back
    retention = expected_retention(work.sent, last)
    assert {(c, o): (p, r) for c, o, p, r, _ in data.retention} == retention
    assert charts.values[("retention", "rect.cell")] == [r for _, _, _, r, _ in data.retention]
    assert any(r < p for p, r in retention.values()) and any(o > 0 and r > 0 for (_, o), (_, r) in retention.items())

    # sessions: one bar per day, summing to every session of the range; billing events have their own
    bars = charts.values[("sessions", "rect.bar")]
    by_day = {d: n for d, n, _ in data.sessions_by_day}
    assert bars == [by_day.get(d, 0) for d in days(first, last)] and sum(bars) == data.sessions_overall[0]
    assert data.sessions_overall[0] > data.backend_sessions > 0

    # drawn: Chromium renders the file (skips only when Chromium is missing or cannot start)
    binary = request.getfixturevalue("chromium")
    profile = tmp_path / "profile"
    shot = tmp_path / "report.png"
    result = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}",
                             "--window-size=900,2600", "--hide-scrollbars", path.as_uri()],
                            capture_output=True, text=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == (900, 2600)
    colours = Counter(row[i:i + 3] for row in rows[::2] for i in range(0, len(row), 6))
    assert len(colours) > 50, "a blank, single-colour screenshot"
    assert colours.most_common(1)[0][1] < 0.8 * sum(colours.values())
    # the bars and lines were painted: their colours cover real areas of the page
    assert colours[BLUE] > 1000 and colours[GREEN] > 1000, (colours[BLUE], colours[GREEN])
    dom = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=90).stdout
    for title in TITLES:
        assert f"<h2>{title}</h2>" in dom
    assert dom.count("<svg") == 5 and dom.count('class="bar"') == len(bars) + len(dac) + len(funnel)


def test_a_report_without_data_says_so_in_every_section():
    page = render_html(ReportData(date(2026, 1, 5), date(2026, 1, 11), dau=[(d, 0) for d in days(date(2026, 1, 5), date(2026, 1, 11))]))
    charts = Charts()
    charts.feed(page)
    assert charts.titles == list(TITLES)
    assert page.count('class="no-data"') == 5 and charts.tags["svg"] == 0
