"""Identity of Cortex processes as NATS services, so ``nats micro ls`` lists the fleet.

Each neuron and each gateway registers a NATS "micro" service (answering ``$SRV.PING``,
``$SRV.INFO`` and ``$SRV.STATS``). The service names are defined here, once, for both sides.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Final

NEURON_SERVICE: Final = "cortex-neuron"
GATEWAY_SERVICE: Final = "cortex-gateway"
_SEMVER: Final = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


@functools.cache
def package_version() -> str:
    """The installed Cortex version, reported in heartbeats, ``--version`` and service info
    (read once: a metadata lookup costs milliseconds, and heartbeats go out every second)."""
    try:
        return version("cortex-fleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def service_version(value: str) -> str:
    """A semantic version NATS micro accepts (``0.0.0`` when ``value`` is not one)."""
    return value if _SEMVER.match(value) else "0.0.0"
