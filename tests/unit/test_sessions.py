"""Server-side sessions (semantics §3): ``client_session_id``, ``session_uuid7`` and
``assign_session`` as plain functions over a person's JSON state, no broker."""

from __future__ import annotations

import copy
import hashlib
import json
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.identity.steps.sessions import (
    HOUR_US,
    MINUTE_US,
    SessionRules,
    assign_session,
    client_session_id,
    session_uuid7,
)

T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z, in µs
TEAM = 1
PERSON = "0190a1b2-0000-5000-8000-000000000001"
RULES = SessionRules()  # 30 min, 24 h, 1 h late, 8 kept
SECOND_US = 1_000_000


def at(minutes: float) -> int:
    return T0 + int(minutes * MINUTE_US)


def sid(start_us: int, person: str = PERSON, team: int = TEAM) -> str:
    return session_uuid7(team, person, start_us)


def run(times: list[int], rules: SessionRules = RULES, state: dict | None = None,
        person: str = PERSON, team: int = TEAM) -> tuple[list[str], dict | None]:
    """Feed the events in arrival order; the session id of each and the final state."""
    ids = []
    for ts in times:
        session_id, state = assign_session(state, team, person, ts, rules)
        ids.append(session_id)
    return ids, state


# --- client session ids ------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
    ("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"),
    ("550E8400-E29B-41D4-A716-446655440000", "550e8400-e29b-41d4-a716-446655440000"),  # v4: any version
    ("My-Session-42", "My-Session-42"),
    ("{0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B}", "{0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B}"),  # not canonical
    ("0190A1B2C3D47E5F8A9B0C1D2E3F4A5B", "0190A1B2C3D47E5F8A9B0C1D2E3F4A5B"),  # no hyphens
    ("0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B\n", "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B\n"),
    (" ", " "),
    ("", None),
    (None, None),
    (42, None),
    (4.2, None),
    (True, None),
    (["0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"], None),
    ({"id": "x"}, None),
], ids=["upper_uuid7_lowered", "lower_uuid7_kept", "upper_uuid4_lowered", "non_uuid_kept_as_is",
        "braced_kept", "unhyphenated_kept", "trailing_newline_kept", "blank_kept", "empty", "absent",
        "int", "float", "bool", "list", "object"])
def test_client_session_id(value, expected):
    assert client_session_id(value) == expected


# --- the id ------------------------------------------------------------------------------------

def test_session_uuid7_is_pinned():
    """The derivation is part of the stored data: changing it would re-id replayed sessions."""
    assert session_uuid7(1, "person-1", T0) == "018bcfe5-6800-7c4d-9a6c-d5a298ce1c4e"
    assert session_uuid7(1, "person-1", T0) == session_uuid7(1, "person-1", T0)


@pytest.mark.parametrize(("team", "person", "start_us"), [
    (1, "person-1", T0),
    (2, PERSON, T0 + 123_456),
    (7, "ünïcode:with:colons", 0),
    (1, "", 281_474_976_710_655_999),  # the last ms of the 48-bit range
])
def test_session_uuid7_layout(team, person, start_us):
    text = session_uuid7(team, person, start_us)
    value = uuid.UUID(text)
    digest = hashlib.blake2b(f"{team}:{person}:{start_us}".encode(), digest_size=10).digest()
    assert text == str(value) and text == text.lower()
    assert value.version == 7 and value.int >> 76 & 0xF == 7
    assert value.variant == uuid.RFC_4122 and value.int >> 62 & 0b11 == 0b10
    assert value.int >> 80 == start_us // 1000
    assert value.int >> 64 & 0xFFF == int.from_bytes(digest[:2], "big") & 0xFFF
    assert value.int & (1 << 62) - 1 == int.from_bytes(digest[2:], "big") & (1 << 62) - 1


def test_ids_differ_by_team_person_and_start():
    ids = {session_uuid7(t, p, s) for t in (1, 2) for p in ("a", "b", "1:a") for s in (T0, T0 + 1)}
    assert len(ids) == 12


def test_different_persons_never_share_a_session_id():
    times = [at(m) for m in (0, 10, 50, 95, 100)]
    persons = [f"person-{i}" for i in range(50)]
    by_person = {p: run(times, person=p)[0] for p in persons}
    for p, ids in by_person.items():
        assert ids == [sid(at(0), p)] * 2 + [sid(at(50), p)] + [sid(at(95), p)] * 2
    all_ids = [i for ids in by_person.values() for i in set(ids)]
    assert len(all_ids) == 150 and len(set(all_ids)) == 150
    other_team, _ = run(times, team=2)
    assert set(other_team).isdisjoint(run(times)[0])


# --- in order: timeout and maximum length -------------------------------------------------------

@pytest.mark.parametrize(("gap_us", "same"), [
    (30 * MINUTE_US - 1, True),
    (30 * MINUTE_US, True),
    (30 * MINUTE_US + 1, False),
], ids=["just_under_timeout", "exactly_timeout", "just_over_timeout"])
def test_timeout_boundary(gap_us, same):
    ids, state = run([T0, T0 + gap_us])
    assert ids[0] == sid(T0)
    assert ids[1] == (sid(T0) if same else sid(T0 + gap_us))
    assert len(state["s"]) == (1 if same else 2)


def test_timeout_counts_from_the_last_event_not_the_start():
    ids, _ = run([at(0), at(25), at(50), at(75), at(106)])
    assert ids == [sid(at(0))] * 4 + [sid(at(106))]


def test_timeout_is_a_parameter():
    rules = SessionRules(timeout_us=5 * MINUTE_US)
    ids, _ = run([at(0), at(5), at(10.5)], rules)
    assert ids == [sid(at(0)), sid(at(0)), sid(at(10.5))]


def test_a_stream_every_10_minutes_for_30_hours_is_cut_by_the_24_hour_cap():
    times = [at(10 * i) for i in range(181)]  # 0 .. 1800 min
    ids, _ = run(times)
    assert ids[:145] == [sid(at(0))] * 145  # 0 .. 1440 min: exactly 24 h is still the session
    assert ids[145:] == [sid(at(1450))] * 36  # 1450 min: 24 h 10 min > 24 h, a new session
    assert uuid.UUID(ids[145]).int >> 80 == at(1450) // 1000


@pytest.mark.parametrize(("over_us", "same"), [(0, True), (1, False)], ids=["exactly_cap", "cap_plus_1us"])
def test_maximum_length_boundary(over_us, same):
    rules = SessionRules(max_length_us=2 * HOUR_US)
    times = [at(20 * i) for i in range(6)] + [at(120) + over_us]
    ids, _ = run(times, rules)
    assert ids[:6] == [sid(at(0))] * 6
    assert ids[6] == (sid(at(0)) if same else sid(at(120) + over_us))


def test_equal_timestamps_share_the_session():
    ids, state = run([T0, T0, T0])
    assert ids == [sid(T0)] * 3
    assert state == {"n": T0, "s": [[T0, T0, T0, T0]]}


# --- out of order within the lateness -----------------------------------------------------------

def test_a_late_event_inside_a_session_joins_it():
    ids, state = run([at(0), at(10), at(20), at(15)])
    assert ids == [sid(at(0))] * 4
    assert state == {"n": at(20), "s": [[at(0), at(20), at(0), at(20)]]}


def test_a_late_event_extending_the_start_keeps_the_id():
    ids, state = run([at(60), at(70), at(40), at(15), at(5)])
    assert ids == [sid(at(60))] * 5
    assert uuid.UUID(ids[-1]).int >> 80 == at(60) // 1000  # the first event that opened it, not 5 min
    assert state == {"n": at(70), "s": [[at(5), at(70), at(60), at(70)]]}


def test_a_late_event_extending_the_end_of_an_earlier_session():
    ids, state = run([at(0), at(10), at(60), at(33)])  # 33: 23 min after the first session, 27 before the second
    assert ids == [sid(at(0)), sid(at(0)), sid(at(60)), sid(at(0))]
    assert state["s"] == [[at(60), at(60), at(60), at(60)], [at(0), at(33), at(0), at(60)]]


def test_a_late_event_never_extends_a_session_beyond_the_cap():
    rules = SessionRules(max_length_us=2 * HOUR_US, lateness_us=3 * HOUR_US)
    times = [at(20 * i) for i in range(7)] + [at(-10), at(-15)]  # 0 .. 120 min is exactly 2 h
    ids, state = run(times, rules)
    assert ids == [sid(at(0))] * 7 + [sid(at(-10))] * 2
    assert state["s"] == [[at(0), at(120), at(0), at(120)], [at(-15), at(-10), at(-10), at(120)]]


def test_a_late_event_after_a_cap_cut_joins_the_later_session():
    rules = SessionRules(max_length_us=2 * HOUR_US)
    times = [at(20 * i) for i in range(7)] + [at(130), at(140), at(125)]
    ids, _ = run(times, rules)
    assert ids == [sid(at(0))] * 7 + [sid(at(130))] * 3  # 125 would make the first 2 h 5 min long


@pytest.mark.parametrize(("late_minute", "joins"), [
    (30, 0),  # 20 min from each: a tie, the session that started first
    (29, 0),  # 19 from the first, 21 from the second: nearest
    (31, 50),  # 21 from the first, 19 from the second: nearest
], ids=["tie_earlier_start", "nearer_first", "nearer_second"])
def test_an_event_bridging_two_sessions_joins_one_and_ids_never_change(late_minute, joins):
    ids, state = run([at(0), at(10), at(50), at(60), at(late_minute), at(70)])
    assert ids == [sid(at(0))] * 2 + [sid(at(50))] * 2 + [sid(at(joins)), sid(at(50))]
    assert sorted(s[2] for s in state["s"]) == [at(0), at(50)]  # still two sessions, never merged


# --- later than the lateness --------------------------------------------------------------------

def test_very_late_events_start_their_own_session_and_the_next_one_near_it_joins():
    times = [at(0), at(10), at(20), at(300),  # the first session is forgotten: unused for 4 h 40 min
             at(25), at(40), at(120), at(310)]
    ids, state = run(times)
    assert ids == [sid(at(0))] * 3 + [sid(at(300))] + [sid(at(25))] * 2 + [sid(at(120)), sid(at(300))]
    assert sid(at(25)) != sid(at(0))
    assert state == {"n": at(310), "s": [
        [at(25), at(40), at(25), at(300)],
        [at(120), at(120), at(120), at(300)],
        [at(300), at(310), at(300), at(310)],
    ]}


def test_a_very_late_event_joins_a_kept_session_it_fits():
    ids, state = run([at(0), at(80), at(10)])  # 10 is 70 min late; 0's session is kept until 90
    assert ids == [sid(at(0)), sid(at(80)), sid(at(0))]
    assert state["s"] == [[at(80), at(80), at(80), at(80)], [at(0), at(10), at(0), at(80)]]


def test_a_late_session_ages_out_once_the_newest_time_moves_past_lateness_and_timeout():
    # the late session opened at 25 was last used when the newest time was 300: kept until 390
    kept, _ = run([at(0), at(300), at(25), at(389), at(30)])
    assert kept == [sid(at(0)), sid(at(300)), sid(at(25)), sid(at(389)), sid(at(25))]
    forgotten, state = run([at(0), at(300), at(25), at(389), at(391), at(30)])
    assert forgotten == [sid(at(0)), sid(at(300)), sid(at(25)), sid(at(389)), sid(at(389)), sid(at(30))]
    assert [s[2] for s in state["s"]] == [at(389), at(30)]


def test_a_very_late_event_at_the_first_instant_of_a_forgotten_session_gets_its_id_again():
    """Ids depend on (team, person, opening time) only: an event at exactly the µs that opened a
    forgotten session re-opens that id, which is the session it belongs to. What the re-opened
    session gathers afterwards is judged against it alone (module docstring)."""
    ids, state = run([at(0), at(10), at(300), at(0), at(-25)])
    assert ids == [sid(at(0))] * 2 + [sid(at(300))] + [sid(at(0))] * 2
    assert state["s"] == [[at(300), at(300), at(300), at(300)], [at(-25), at(0), at(0), at(300)]]


def test_lateness_is_a_parameter():
    times = [at(0), at(20), at(200), at(25)]
    short, _ = run(times, SessionRules(lateness_us=HOUR_US))
    long, _ = run(times, SessionRules(lateness_us=3 * HOUR_US))
    assert short[3] == sid(at(25))
    assert long[3] == sid(at(0))


# --- state ---------------------------------------------------------------------------------------

def test_the_input_state_is_not_mutated():
    _, state = run([at(0), at(40), at(80)])
    before = copy.deepcopy(state)
    session_id, after = assign_session(state, TEAM, PERSON, at(20), RULES)
    assert state == before
    assert session_id == sid(at(0))
    assert after == {"n": at(80), "s": [[at(40), at(40), at(40), at(40)], [at(80), at(80), at(80), at(80)],
                                        [at(0), at(20), at(0), at(80)]]}


def test_the_state_survives_a_json_round_trip():
    times = [at(m) for m in (0, 10, 60, 35, 500, 100, 505)]
    direct, _ = run(times)
    state = None
    restored = []
    for ts in times:
        session_id, state = assign_session(state, TEAM, PERSON, ts, RULES)
        state = json.loads(json.dumps(state))
        restored.append(session_id)
    assert restored == direct


def test_kept_sessions_are_capped_dropping_the_least_recently_used():
    rules = SessionRules(max_kept=3)
    ids, state = run([at(1000), at(0), at(100), at(200), at(300), at(5)], rules)
    # 0 was the least recently used when 300 came: forgotten, so 5 opens a session of its own
    assert ids[-1] == sid(at(5))
    assert [s[2] for s in state["s"]] == [at(200), at(300), at(5)]


def test_state_stays_bounded_for_a_long_stream():
    state = None
    ts = T0
    most_sessions = largest_json = 0
    for i in range(20_000):
        ts += (37 + i % 11 * 7) * MINUTE_US if i % 7 == 0 else MINUTE_US
        # every other event 2 h to 11 h 24 min late: each opens a late session, until the cap drops it
        late = ts - (2 * HOUR_US + (i % 13) * 47 * MINUTE_US) if i % 2 == 0 else ts
        session_id, state = assign_session(state, TEAM, "person-with-a-long-history", late, RULES)
        assert uuid.UUID(session_id).version == 7
        most_sessions = max(most_sessions, len(state["s"]))
        largest_json = max(largest_json, len(json.dumps(state, separators=(",", ":"))))
    assert most_sessions == 8
    # {"n":<16 digits>,"s":[ 8 x [4 ints of 16 digits] ]}: 5 + 16 + 6 + 8 * 69 + 7 + 2 = 588
    assert largest_json <= 588


def test_rules_refuse_nonsense():
    with pytest.raises(ValueError):
        SessionRules(timeout_us=-1)
    with pytest.raises(ValueError):
        SessionRules(max_kept=0)


# --- properties ----------------------------------------------------------------------------------

def posthog_js_starts(times: list[int], rules: SessionRules) -> list[int]:
    """Reference: posthog-js ``checkAndGetSessionAndWindowId`` over an in-order stream."""
    starts, start, last = [], None, None
    for ts in times:
        if start is None or ts - last > rules.timeout_us or ts - start > rules.max_length_us:
            start = ts
        last = ts
        starts.append(start)
    return starts


rules_strategy = st.builds(
    lambda timeout, extra, late, kept: SessionRules(timeout * MINUTE_US, timeout * MINUTE_US + extra * MINUTE_US,
                                                    late * MINUTE_US, kept),
    st.integers(1, 60), st.integers(0, 300), st.integers(0, 180), st.integers(1, 8))
gaps_strategy = st.lists(st.one_of(st.integers(0, 2 * HOUR_US), st.sampled_from(
    [0, 1, 30 * MINUTE_US - 1, 30 * MINUTE_US, 30 * MINUTE_US + 1, 60 * MINUTE_US])), min_size=1, max_size=80)
# Out of order, event times are distinct: two events of a person at the same µs, one of them later
# than a forgotten session, share its id (see the test of a forgotten session's first instant).
distinct_gaps_strategy = st.lists(st.one_of(st.integers(1, 2 * HOUR_US), st.sampled_from(
    [1, 30 * MINUTE_US - 1, 30 * MINUTE_US, 30 * MINUTE_US + 1, 60 * MINUTE_US])), min_size=1, max_size=80)


@settings(max_examples=150, deadline=None)
@given(gaps=gaps_strategy, rules=rules_strategy)
def test_in_order_streams_match_posthog_js(gaps, rules):
    times = [T0 + sum(gaps[:i + 1]) for i in range(len(gaps))]
    ids, state = run(times, rules)
    assert ids == [sid(start) for start in posthog_js_starts(times, rules)]
    assert len(state["s"]) <= rules.max_kept


@settings(max_examples=300, deadline=None)
@given(gaps=distinct_gaps_strategy, delays=st.lists(st.integers(0, 4 * HOUR_US), min_size=80, max_size=80),
       rules=rules_strategy)
def test_out_of_order_streams_keep_the_session_invariants(gaps, delays, rules):
    event_times = [T0 + sum(gaps[:i + 1]) for i in range(len(gaps))]
    arrival = sorted(range(len(event_times)), key=lambda i: (event_times[i] + delays[i], i))
    times = [event_times[i] for i in arrival]
    ids, state = run(times, rules)

    assert len(ids) == len(times) and all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122
                                          for i in ids)  # nothing dropped, every event has an id
    sessions: dict[str, list[int]] = {}
    for session_id, ts in zip(ids, times):
        sessions.setdefault(session_id, []).append(ts)
    for session_id, members in sessions.items():
        members.sort()
        assert all(b - a <= rules.timeout_us for a, b in zip(members, members[1:]))
        assert members[-1] - members[0] <= rules.max_length_us
        assert uuid.UUID(session_id).int >> 80 in {ts // 1000 for ts in members}  # its opening event
    assert run(times, rules)[0] == ids  # replay: the same events in the same order, the same ids
    assert len(state["s"]) <= rules.max_kept
    assert state["n"] == max(times)
