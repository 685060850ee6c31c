"""Stream processors: ``events_raw`` in, ``events_enriched`` (plus persons, groups, warnings and
dead letters) out. One package per stage; each stage's ``pipeline.py`` lists its steps in order.
"""
