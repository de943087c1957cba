"""A neuron whose model costs nothing to run, for measuring what the bus and the gateway add.

It is the real `neuron.worker.Worker` (admission, the model's thread, chunk coalescing, the stream
protocol) with an engine that yields one short word per token without computing anything. A
generation yields ``max_tokens`` tokens (the request's, capped by ``--tokens``), then finishes with
reason ``length``. Prints ``READY`` on stdout once the model is served; SIGTERM or SIGINT drains
and exits.

Run:  .venv/bin/python -m bench.instant_neuron --nats-url nats://127.0.0.1:4222 [--tokens 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from neuron.engines.base import (
    Finish,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Step,
)
from neuron.settings import ModelSpec, NeuronSettings
from neuron.text.chat_template import TemplateMessage, TemplateValue
from neuron.worker import Worker

MODEL_ID: Final = "bench/instant"
#: The text of every generated token.
WORD: Final = " tok"
#: Far above any prompt plus any generation the bench asks for: the context never clamps.
CONTEXT_LENGTH: Final = 1 << 20


@dataclass
class InstantModel:
    files: ModelFiles
    tokens: int

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            model_id=self.files.model_id, engine="instant", format=self.files.format,
            architecture="instant", context_length=CONTEXT_LENGTH, vocab_size=1, parameters=0,
            memory_bytes=0, device="cpu", dtype="none",
        )

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        return " ".join(str(m.get("content") or "") for m in messages)

    def encode(self, text: str) -> list[int]:
        return [0] * max(1, len(text.split()))

    def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, cancelled: threading.Event
    ) -> Iterator[Step | Finish]:
        count = min(params.max_tokens, self.tokens)
        for i in range(count):
            if cancelled.is_set():
                yield Finish(reason="cancelled", completion_tokens=i)
                return
            yield Step(token_id=0, text=WORD)
        yield Finish(reason="length", completion_tokens=count)

    def close(self) -> None:
        pass


class InstantEngine:
    """Loads any path as an `InstantModel`."""

    name = "torch"  # the harness name load requests default to

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def load(self, files: ModelFiles, progress: ProgressCallback) -> InstantModel:
        progress(1.0, "instant")
        return InstantModel(files=files, tokens=self.tokens)


async def serve(settings: NeuronSettings, tokens: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings, InstantEngine(tokens))
    await worker.start()
    try:
        async with asyncio.timeout(60):
            await worker.ready.wait()
        print("READY", flush=True)
        await stop.wait()
    finally:
        await worker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--root", default="cortex")
    parser.add_argument("--name", default="instant")
    parser.add_argument("--model-id", default=MODEL_ID)
    parser.add_argument("--tokens", type=int, default=4096,
                        help="most tokens per generation; a request's max_tokens asks for fewer")
    parser.add_argument("--max-jobs", type=int, default=1024)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="instant-neuron-") as tmp:
        weights = Path(tmp) / "instant.gguf"  # resolves as a local GGUF; never read
        weights.write_bytes(b"")
        settings = NeuronSettings(
            name=args.name, nats_url=args.nats_url, root=args.root, max_jobs=args.max_jobs,
            max_waiting=args.max_jobs,
            drain_timeout_s=5.0,
            models=(ModelSpec(source=str(weights), served_name=args.model_id),),
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings, args.tokens))


if __name__ == "__main__":
    main()
