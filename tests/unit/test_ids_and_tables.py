import uuid

from headwater.ids import uuid7, uuid7_unix_ms
from headwater.tables import render


def test_uuid7_is_version_7_time_ordered_and_deterministic_with_given_randomness():
    a = uuid7(1_700_000_000_000, bytes(10))
    assert a.version == 7 and a.variant == uuid.RFC_4122
    assert uuid7_unix_ms(a) == 1_700_000_000_000
    assert uuid7(1_700_000_000_000, bytes(10)) == a
    assert uuid7(1_700_000_000_001) > a


def test_render_table_aligns_and_counts_rows():
    text = render(["event", "n"], [("$pageview", 10), ("signed_up", 2)])
    lines = text.splitlines()
    assert lines[0].startswith("event")
    assert lines[-1] == "(2 rows)"
    assert render(["a"], [(1,)], "json") == '{"a": 1}'
