"""The contract between the Cortex gateway and its neurons: subjects, messages, codec.

Depends on msgspec and the standard library only; both sides import it and nothing else is shared.
"""

from bus_schema.messages import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
