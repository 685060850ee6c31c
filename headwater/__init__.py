"""headwater: the shared home of what the stages agree on.

Wire models, topic declarations, the keying rule, outcomes, settings, the embedded broker and
ClickHouse, and the command line. ``producers``, ``processors`` and ``sinks`` import this package;
they never import each other's internals.
"""

__version__ = "0.1.0"
