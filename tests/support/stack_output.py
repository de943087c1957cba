"""The combined output of a `cortex up` process, read as it comes (the way a user watches the
terminal)."""

from __future__ import annotations

import subprocess
import threading


class Output:
    """Reads the stack's combined output as it comes; ``ready`` is set once it serves."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._stdout:
            self.lines.append(line)
            if "ready: http://" in line:
                self.ready.set()

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)
