"""The typed dependencies route handlers receive by name (provided in `cortex.app.create_app`)."""

from __future__ import annotations

from typing import TypeAlias

from litestar.di import NamedDependency

from cortex.bus import GatewayBus
from cortex.settings import GatewaySettings
from cortex.tokens import TokenCounter

Bus: TypeAlias = NamedDependency[GatewayBus]
Settings: TypeAlias = NamedDependency[GatewaySettings]
Tokens: TypeAlias = NamedDependency[TokenCounter]
