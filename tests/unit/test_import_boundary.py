"""The gateway and the contract must never pull in torch or the neuron."""

from __future__ import annotations

import subprocess
import sys

_GATEWAY = """
import sys
import bus_schema, bus_schema.codec, cortex.app, cortex.cli, cortex.stack
bad = sorted(m for m in sys.modules
             if m.split('.')[0] in ('torch', 'neuron', 'ctransformers', 'numpy'))
print(','.join(bad))
sys.exit(1 if bad else 0)
"""

# msgspec itself may load typing_extensions; nothing else outside the standard library.
_CONTRACT = """
import sys
before = set(sys.modules)
import bus_schema.codec, bus_schema.subjects
new = {m.split('.')[0] for m in set(sys.modules) - before}
extra = new - {'bus_schema', 'msgspec', 'typing_extensions'} - set(sys.stdlib_module_names)
print(sorted(extra))
sys.exit(1 if extra else 0)
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)


def test_gateway_imports_neither_torch_nor_neuron() -> None:
    result = _run(_GATEWAY)
    assert result.returncode == 0, f"gateway imported: {result.stdout} {result.stderr}"


def test_bus_schema_depends_only_on_msgspec() -> None:
    result = _run(_CONTRACT)
    assert result.returncode == 0, result.stdout + result.stderr
