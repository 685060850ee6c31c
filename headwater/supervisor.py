"""Child processes for ``headwater up``: start, watch, restart, and stop them all.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the supervisor, which
then stops children in reverse start order) and asks the kernel to kill it if the supervisor
dies (``PR_SET_PDEATHSIG``), so no broker or ClickHouse outlives ``headwater up``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    restart: bool = True
    log_path: Path | None = None
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.children: list[Child] = []
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, *, restart: bool = True) -> Child:
        child = Child(name, argv, {**os.environ, **(env or {})}, restart, self.log_dir / f"{name}.log")
        self._spawn(child)
        self.children.append(child)
        return child

    def _spawn(self, child: Child) -> None:
        assert child.log_path is not None
        out = open(child.log_path, "ab")
        child.process = subprocess.Popen(
            child.argv,
            env=child.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        out.close()
        child.started_at = time.monotonic()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def check(self) -> list[str]:
        """Restart children that died (with a short backoff); return what happened."""
        events = []
        for child in self.children:
            if child.alive or child.process is None:
                continue
            code = child.process.returncode
            if not child.restart:
                events.append(f"{child.name} exited with {code}")
                continue
            if time.monotonic() - child.started_at < min(30, 2 ** child.restarts):
                continue
            child.restarts += 1
            events.append(f"{child.name} exited with {code}; restarting (#{child.restarts})")
            log.warning(events[-1])
            self._spawn(child)
        return events

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM children in reverse start order; SIGKILL whatever is left after ``timeout``."""
        for child in reversed(self.children):
            if not child.alive:
                continue
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", child.name, timeout)
                child.process.kill()
                child.process.wait()
