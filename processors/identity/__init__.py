"""Stage ``identity``, keyed by ``token:distinct_id``: parse and validate raw events, resolve the
team and the person id, and emit event rows. Later stages (persons, groups, sessions) hang off it.
"""
