"""The demo's HTML report: the SQL cookbook's queries run against ClickHouse, drawn as inline SVG.

``collect`` runs the queries (the files of ``docs/sql/``, bound with server-side parameters as an
analyst would run them) and returns their rows as a ``ReportData``; ``render_html`` turns that into
ONE self-contained HTML file: inline CSS, charts as SVG computed here, no script and nothing
fetched from the network, so it opens anywhere, offline, and can be mailed. Every chart element
carries the number it draws (``data-value``), and every chart has a table of its numbers under it.
A chart without data is a "no data" note, not an error.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

COOKBOOK = Path(__file__).resolve().parent.parent / "docs" / "sql"

FUNNEL_STEPS = ["$pageview", "signed_up", "project_created"]
FUNNEL_LABELS = {"$pageview": "Visited the site", "signed_up": "Signed up", "project_created": "Created a project"}
FUNNEL_WINDOW_S = 14 * 86400
RETENTION_START, RETENTION_RETURN, RETENTION_WEEKS = "signed_up", "$pageview", 4

TITLES = ("Daily active users", "Daily active companies", "Signup funnel", "Weekly retention", "Sessions")

# No cookbook file counts groups per day (groups/weekly_active_groups.sql counts per week): this is
# that file's query with days for weeks, same rules (activity excludes $groupidentify).
DAILY_ACTIVE_GROUPS = """
WITH
    (SELECT group_type_index FROM {db}.group_types
     WHERE team_id = {{team_id:Int64}} AND group_type = {{group_type:String}} LIMIT 1) AS type_index,
    [`$group_0`, `$group_1`, `$group_2`, `$group_3`, `$group_4`][type_index + 1] AS group_key
SELECT toDate(timestamp) AS day, uniqExact(group_key) AS active_groups
FROM {db}.events
WHERE team_id = {{team_id:Int64}}
    AND toDate(timestamp) BETWEEN {{date_from:Date}} AND {{date_to:Date}}
    AND event != '$groupidentify'
    AND group_key != ''
GROUP BY day
ORDER BY day WITH FILL FROM {{date_from:Date}} TO {{date_to:Date}} + 1 STEP 1
"""

TOTALS = """
SELECT
    count() AS events,
    uniqExactIf(person_id, event != '$groupidentify') AS persons,
    uniqExactIf(distinct_id, event != '$groupidentify') AS distinct_ids
FROM {db}.events_with_person
WHERE team_id = {{team_id:Int64}} AND toDate(timestamp) BETWEEN {{date_from:Date}} AND {{date_to:Date}}
"""

BACKEND_SESSIONS = """
SELECT countIf(pageviews = 0) FROM {db}.sessions
WHERE team_id = {{team_id:Int64}} AND toDate(start) BETWEEN {{date_from:Date}} AND {{date_to:Date}}
"""

_QUALIFIED = re.compile(r"(?<![\w.])headwater\.")


def cookbook_sql(name: str, database: str) -> str:
    """The SQL of cookbook query ``name`` (``trends/daily_active_users``) on ``database``."""
    return _QUALIFIED.sub(f"{database}.", (COOKBOOK / f"{name}.sql").read_text())


@dataclass
class ReportData:
    date_from: date
    date_to: date
    dau: list[tuple[date, int]] = field(default_factory=list)
    dac: list[tuple[date, int]] = field(default_factory=list)
    funnel: list[tuple[int, str, int, float, float]] = field(default_factory=list)
    retention: list[tuple[date, int, int, int, float]] = field(default_factory=list)
    sessions_by_day: list[tuple[date, int, float]] = field(default_factory=list)
    sessions_overall: tuple[int, float] = (0, 0.0)
    bounce_by_source: list[tuple[str, int, int, float]] = field(default_factory=list)
    backend_sessions: int = 0
    events: int = 0
    persons: int = 0
    distinct_ids: int = 0
    companies: list[tuple[str, int, str]] = field(default_factory=list)  # key, events, current plan
    generated_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def bounce_rate(self) -> float | None:
        sessions = sum(r[1] for r in self.bounce_by_source)
        return sum(r[2] for r in self.bounce_by_source) / sessions if sessions else None

    def plans(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, plan in self.companies:
            counts[plan] = counts.get(plan, 0) + 1
        return counts


def collect(ch: Any, database: str, *, team_id: int, date_from: date, date_to: date) -> ReportData:
    """Run the report's queries for one team and UTC days ``date_from``..``date_to`` (included)."""
    params = {"team_id": team_id, "date_from": date_from, "date_to": date_to}

    def cookbook(name: str, **extra: Any) -> list[tuple]:
        return ch.query(cookbook_sql(name, database), parameters={**params, **extra}).result_rows

    def own(sql: str, **extra: Any) -> list[tuple]:
        return ch.query(sql.format(db=database), parameters={**params, **extra}).result_rows

    data = ReportData(date_from, date_to)
    data.dau = [(d, int(n)) for d, n in cookbook("trends/daily_active_users")]
    data.dac = [(d, int(n)) for d, n in own(DAILY_ACTIVE_GROUPS, group_type="company")]
    data.funnel = [tuple(r) for r in cookbook("funnels/ordered_funnel", steps=FUNNEL_STEPS, window_seconds=FUNNEL_WINDOW_S)]
    data.retention = [tuple(r) for r in cookbook("retention/weekly_retention", start_event=RETENTION_START,
                                                 return_event=RETENTION_RETURN, weeks=RETENTION_WEEKS)]
    sessions = cookbook("sessions/session_duration")
    data.sessions_by_day = [(d, int(n), float(avg)) for d, n, avg in sessions if d is not None]
    overall = [(int(n), float(avg)) for d, n, avg in sessions if d is None]
    data.sessions_overall = overall[0] if overall and overall[0][0] else (0, 0.0)
    data.bounce_by_source = [tuple(r) for r in cookbook("sessions/bounce_rate_by_utm_source")]
    [(data.backend_sessions,)] = own(BACKEND_SESSIONS)
    [(data.events, data.persons, data.distinct_ids)] = own(TOTALS)
    for key, events, *_, properties, _created in cookbook("groups/top_groups", group_type="company", limit=1000):
        plan = json.loads(properties).get("plan", "?") if properties else "?"
        data.companies.append((key, int(events), str(plan)))
    return data


# -- drawing -------------------------------------------------------------------------------------------

W, H = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 48
_esc = html.escape


def _nice_max(value: float) -> float:
    """The top of a value axis: the smallest of 1, 2, 2.5, 5 × 10^k at or above ``value``."""
    if value <= 0:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if value <= m * magnitude)


def _axes(y_max: float, labels: list[str], y_title: str, x_title: str, fmt=lambda v: f"{v:g}") -> list[str]:
    """Y grid lines with tick labels at 0, ½ and the top; x labels (at most ~10); axis titles."""
    plot_h, plot_w = H - TOP - BOTTOM, W - LEFT - RIGHT
    out = [f'<line class="axis" x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}"/>',
           f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}"/>']
    for fraction in (0, 0.5, 1):
        y = H - BOTTOM - plot_h * fraction
        out.append(f'<line class="grid" x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_esc(fmt(y_max * fraction))}</text>')
    every = max(1, -(-len(labels) // 10))
    slot = plot_w / max(len(labels), 1)
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            out.append(f'<text class="tick" x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{_esc(label)}</text>')
    out.append(f'<text class="axis-title" x="{LEFT + plot_w / 2:.1f}" y="{H - 6}" text-anchor="middle">{_esc(x_title)}</text>')
    out.append(f'<text class="axis-title" x="14" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {TOP + plot_h / 2:.1f})">{_esc(y_title)}</text>')
    return out


def _svg(name: str, parts: list[str], height: int = H) -> str:
    return (f'<svg class="chart" id="chart-{name}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
            f'viewBox="0 0 {W} {height}" role="img">{"".join(parts)}</svg>')


def _short(day: date) -> str:
    return day.strftime("%b %d")


def bar_chart(name: str, points: list[tuple[str, int]], *, y_title: str, x_title: str) -> str:
    """One bar per point, height proportional to its value; each bar a ``rect.bar`` with ``data-value``."""
    y_max = _nice_max(max(v for _, v in points))
    plot_h, slot = H - TOP - BOTTOM, (W - LEFT - RIGHT) / len(points)
    parts = _axes(y_max, [label for label, _ in points], y_title, x_title)
    for i, (label, value) in enumerate(points):
        h = plot_h * value / y_max
        x = LEFT + slot * i + slot * 0.15
        parts.append(f'<rect class="bar" data-label="{_esc(label)}" data-value="{value}" x="{x:.1f}" y="{H - BOTTOM - h:.1f}" '
                     f'width="{slot * 0.7:.1f}" height="{h:.1f}"><title>{_esc(label)}: {value}</title></rect>')
    return _svg(name, parts)


def line_chart(name: str, points: list[tuple[str, int]], *, y_title: str, x_title: str) -> str:
    """A polyline through the points and one ``circle.point`` with ``data-value`` per point."""
    y_max = _nice_max(max(v for _, v in points))
    plot_h, slot = H - TOP - BOTTOM, (W - LEFT - RIGHT) / len(points)
    parts = _axes(y_max, [label for label, _ in points], y_title, x_title)
    xy = [(LEFT + slot * (i + 0.5), H - BOTTOM - plot_h * v / y_max) for i, (_, v) in enumerate(points)]
    area = " ".join(f"{x:.1f},{y:.1f}" for x, y in [(xy[0][0], H - BOTTOM), *xy, (xy[-1][0], H - BOTTOM)])
    parts.append(f'<polygon class="area" points="{area}"/>')
    parts.append(f'<polyline class="line" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}"/>')
    for (label, value), (x, y) in zip(points, xy):
        parts.append(f'<circle class="point" data-label="{_esc(label)}" data-value="{value}" cx="{x:.1f}" cy="{y:.1f}" r="3">'
                     f'<title>{_esc(label)}: {value}</title></circle>')
    return _svg(name, parts)


def funnel_chart(name: str, steps: list[tuple[int, str, int, float, float]]) -> str:
    """One horizontal ``rect.bar`` per step, its width proportional to the persons who reached it."""
    row, label_w = 52, 170
    height = TOP + row * len(steps) + 8
    top = max(s[2] for s in steps) or 1
    width = W - LEFT - label_w - 120
    parts = []
    for i, (step, event, persons, conversion, from_previous) in enumerate(steps):
        y = TOP + row * i
        w = width * persons / top
        label = FUNNEL_LABELS.get(event, event)
        parts.append(f'<text class="label" x="{LEFT + label_w - 10}" y="{y + 24}" text-anchor="end">{step}. {_esc(label)}</text>')
        parts.append(f'<rect class="track" x="{LEFT + label_w}" y="{y + 6}" width="{width}" height="28"/>')
        parts.append(f'<rect class="bar" data-label="{_esc(event)}" data-value="{persons}" x="{LEFT + label_w}" y="{y + 6}" '
                     f'width="{w:.1f}" height="28"><title>{_esc(label)}: {persons}</title></rect>')
        pct = "" if conversion != conversion else f" · {conversion * 100:.1f}%"  # nan when nobody did step 1
        parts.append(f'<text class="value" x="{LEFT + label_w + width + 8}" y="{y + 24}">{persons}{pct}</text>')
    return _svg(name, parts, height)


def retention_grid(name: str, rows: list[tuple[date, int, int, int, float]]) -> str:
    """A cohort × week-offset grid of ``rect.cell``: shade by retention, ``data-value`` the returned persons."""
    cohorts = sorted({r[0] for r in rows})
    offsets = max(r[1] for r in rows) + 1
    cell_w, cell_h, label_w = min(110, (W - LEFT - 150) / offsets), 34, 150
    height = TOP + 24 + cell_h * len(cohorts) + 8
    parts = [f'<text class="tick" x="{LEFT}" y="{TOP + 12}">cohort (week of signup)</text>']
    for k in range(offsets):
        parts.append(f'<text class="tick" x="{LEFT + label_w + cell_w * (k + 0.5):.1f}" y="{TOP + 12}" '
                     f'text-anchor="middle">week {k}</text>')
    size = {r[0]: r[2] for r in rows}
    for i, cohort in enumerate(cohorts):
        y = TOP + 24 + cell_h * i
        parts.append(f'<text class="label" x="{LEFT}" y="{y + 22}">{_short(cohort)} ({size[cohort]})</text>')
    for cohort, offset, persons, returned, retention in rows:
        i = cohorts.index(cohort)
        x, y = LEFT + label_w + cell_w * offset, TOP + 24 + cell_h * i
        shade = 0.08 + 0.85 * retention
        parts.append(f'<rect class="cell" data-label="{cohort.isoformat()}+{offset}" data-value="{returned}" x="{x:.1f}" '
                     f'y="{y}" width="{cell_w - 3:.1f}" height="{cell_h - 3}" fill="#2f6fdf" fill-opacity="{shade:.2f}">'
                     f'<title>{cohort.isoformat()} week {offset}: {returned} of {persons}</title></rect>')
        colour = "#fff" if retention > 0.5 else "#123"
        parts.append(f'<text class="cell-text" x="{x + (cell_w - 3) / 2:.1f}" y="{y + 21}" text-anchor="middle" '
                     f'fill="{colour}">{retention * 100:.0f}%</text>')
    return _svg(name, parts, int(height))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _section(key: str, title: str, intro: str, body: str | None) -> str:
    content = body if body is not None else '<p class="no-data">No data for this chart in the report\'s date range.</p>'
    return f'<section id="{key}"><h2>{_esc(title)}</h2><p class="intro">{_esc(intro)}</p>{content}</section>'


def _by_day_section(points: list[tuple[date, int]], key: str, title: str, intro: str, y_title: str, line: bool) -> str:
    if not any(v for _, v in points):
        return _section(key, title, intro, None)
    labelled = [(_short(d), v) for d, v in points]
    draw = line_chart if line else bar_chart
    chart = draw(key, labelled, y_title=y_title, x_title="day (UTC)")
    table = _table(["day", y_title], [[d.isoformat(), v] for d, v in points])
    return _section(key, title, intro, chart + f"<details><summary>numbers</summary>{table}</details>")


def render_html(data: ReportData, *, heading: str = "headwater demo report") -> str:
    """The whole report as one HTML document (inline CSS and SVG, no script, no external resource)."""
    sections = [
        _by_day_section(data.dau, "dau", TITLES[0], "Distinct persons with at least one event per UTC day (merged "
                        "persons once, $groupidentify excluded): cookbook trends/daily_active_users.sql.",
                        "active users", line=True),
        _by_day_section(data.dac, "dac", TITLES[1], "Distinct companies (group type 'company') with at least one "
                        "event per UTC day: groups/weekly_active_groups.sql, by day.", "active companies", line=False),
    ]
    intro = (f"Persons who reached each step in order within {FUNNEL_WINDOW_S // 86400} days, across devices "
             "(identify merges): cookbook funnels/ordered_funnel.sql.")
    if data.funnel and data.funnel[0][2]:
        rows = [[s, FUNNEL_LABELS.get(ev, ev), p, f"{c * 100:.1f}%", f"{fp * 100:.1f}%"] for s, ev, p, c, fp in data.funnel]
        body = funnel_chart("funnel", data.funnel) + _table(["step", "event", "persons", "conversion", "from previous"], rows)
        sections.append(_section("funnel", TITLES[2], intro, body))
    else:
        sections.append(_section("funnel", TITLES[2], intro, None))
    intro = (f"Persons cohorted by the week of their first {RETENTION_START}, and the share who came back "
             f"({RETENTION_RETURN}) 0..{RETENTION_WEEKS} weeks later: cohort retention/weekly_retention.sql.")
    if data.retention:
        rows = [[c.isoformat(), o, p, r, f"{ret * 100:.1f}%"] for c, o, p, r, ret in data.retention]
        body = retention_grid("retention", data.retention) + (
            "<details><summary>numbers</summary>" + _table(["cohort week", "week", "cohort", "returned", "retention"], rows)
            + "</details>")
        sections.append(_section("retention", TITLES[3], intro, body))
    else:
        sections.append(_section("retention", TITLES[3], intro, None))
    intro = ("Sessions per day by start day (web sessions from the SDK's $session_id, server-side ones for backend "
             "events): cookbook sessions/session_duration.sql and sessions/bounce_rate_by_utm_source.sql.")
    if data.sessions_by_day:
        count, avg = data.sessions_overall
        bounce = data.bounce_rate
        stats = _table(["sessions", "average duration", "bounce rate", "backend-only sessions"],
                       [[count, _duration(avg), "–" if bounce is None else f"{bounce * 100:.1f}%", data.backend_sessions]])
        by_day = {d: n for d, n, _ in data.sessions_by_day}
        day, points = data.date_from, []
        while day <= data.date_to:
            points.append((_short(day), by_day.get(day, 0)))
            day = date.fromordinal(day.toordinal() + 1)
        chart = bar_chart("sessions", points, y_title="sessions", x_title="day (UTC) the session started")
        sources = _table(["entry utm_source", "sessions", "bounces", "bounce rate"],
                         [[s or "(none)", n, b, f"{r * 100:.1f}%"] for s, n, b, r in data.bounce_by_source])
        days = _table(["day", "sessions", "average duration"], [[d.isoformat(), n, _duration(a)] for d, n, a in data.sessions_by_day])
        body = stats + chart + sources + f"<details><summary>numbers</summary>{days}</details>"
        sections.append(_section("sessions", TITLES[4], intro, body))
    else:
        sections.append(_section("sessions", TITLES[4], intro, None))
    plans = ", ".join(f"{n} {plan}" for plan, n in sorted(data.plans().items()))
    summary = (f"{data.events:,} events · {data.persons:,} persons ({data.distinct_ids:,} distinct ids) · "
               f"{len(data.companies)} companies ({plans or 'none'}) · {data.date_from.isoformat()} to {data.date_to.isoformat()} (UTC)")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(heading)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body><header><h1>{_esc(heading)}</h1><p class="summary">{_esc(summary)}</p>
<p class="generated">Generated {data.generated_at.strftime('%Y-%m-%d %H:%M UTC')} from ClickHouse queries of the
SQL cookbook (docs/sql/). Self-contained: no scripts, nothing loaded from the network.</p></header>
{''.join(sections)}
</body></html>
"""


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330; margin: 0 auto;
       max-width: 820px; padding: 24px; background: #f6f7fb; }
header h1 { margin: 0 0 4px; font-size: 24px; }
.summary { font-weight: 600; } .generated, .intro { color: #5a6275; font-size: 12.5px; }
section { background: #fff; border: 1px solid #e1e4ee; border-radius: 8px; padding: 12px 18px 16px; margin: 18px 0; }
section h2 { margin: 4px 0 2px; font-size: 18px; }
svg.chart { display: block; margin: 8px 0; max-width: 100%; height: auto; }
.axis { stroke: #8a93a8; stroke-width: 1; } .grid { stroke: #eceef4; stroke-width: 1; }
.tick { font-size: 11px; fill: #5a6275; } .axis-title { font-size: 11.5px; fill: #3b4252; }
.label, .value { font-size: 13px; fill: #1d2330; } .cell-text { font-size: 12px; }
rect.bar { fill: #2f6fdf; } rect.track { fill: #eef1f8; }
polyline.line { fill: none; stroke: #2f6fdf; stroke-width: 2.5; } polygon.area { fill: #2f6fdf; fill-opacity: 0.12; }
circle.point { fill: #fff; stroke: #2f6fdf; stroke-width: 2; }
#dac rect.bar, #sessions rect.bar { fill: #13a07d; }
table { border-collapse: collapse; margin: 8px 0; font-size: 12.5px; }
th, td { border: 1px solid #e1e4ee; padding: 3px 9px; text-align: right; } th { background: #f0f2f8; }
td:first-child, th:first-child { text-align: left; }
.no-data { padding: 16px; background: #fff7e6; border: 1px dashed #e0b050; border-radius: 6px; }
details summary { cursor: pointer; color: #5a6275; font-size: 12.5px; }
"""


def write_report(data: ReportData, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path.resolve()
