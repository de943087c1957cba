"""The torch engine: our own decoder (`torch_decoder`) behind the `Engine` interface.

`TorchEngine.load` reads config, tokenizer, chat template and weights (safetensors or GGUF) and
returns a `TorchModel`. ``TorchModel.generate`` prefills the prompt in chunks, then samples one
token per step with a per-sequence KV cache, streaming text through the incremental detokenizer
and the stop-string matcher. Everything here is blocking and compute-heavy: call it from the
model's own thread, never from an event loop.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal, assert_never

import torch

from neuron.engines.base import (
    Emit,
    Finish,
    GenerationParams,
    ModelFiles,
    ModelInfo,
    ProgressCallback,
    Started,
    Step,
)
from neuron.engines.torch_batching import BatchLoop, BatchStats
from neuron.engines.torch_cpu_kernels import CpuKernels, load_cpu_kernels
from neuron.engines.torch_decoder import DecoderModel
from neuron.engines.torch_quant import (
    WeightKind,
    cpu_has_fast_bf16,
    fbgemm_fp16_available,
    float32_panels,
    quantize,
)
from neuron.engines.torch_threads import OTHER_THREADS, cpu_cores
from neuron.engines.torch_weights import (
    GGUFFile,
    config_from_gguf,
    config_from_hf,
    load_gguf,
    load_safetensors,
)
from neuron.errors import ChatTemplateError, ModelLoadError, ModelNotLoadedError
from neuron.text.chat_template import ChatTemplate, TemplateMessage, TemplateValue
from neuron.text.tokenizer import Tokenizer, gguf_value

logger = logging.getLogger(__name__)

_DTYPES: Final = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
# Share of the progress bar spent before the weights (config, tokenizer, template).
_PREPARE_SHARE: Final = 0.05
Quantize = Literal["auto", "none", "fp16", "int8", "int4"]
#: Reads a prepared model's weights, reporting progress in [0, 1].
_WeightsLoader = Callable[[ProgressCallback], DecoderModel]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a settings string (``auto``: bf16, or fp16 on GPUs without bf16).

    Raises:
        ValueError: an unknown name.
    """
    if dtype == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32"
        ) from None


def _read_json(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return value


def default_prefill_chunk(device: torch.device) -> int:
    """Prompt tokens per step when ``prefill_chunk_tokens`` is not set. Every running sequence
    waits for the step, and on a CPU a 512-token piece takes about 2 s (SmolLM2-135M, one
    core): 128 keeps the others' next token within about half a second, and 16 short prompts
    that arrive together start in two steps instead of all waiting for one big one (their first
    tokens at 0.5 and 1.0 s rather than all at 1.0 s; the aggregate rate is unchanged)."""
    return 128 if device.type == "cpu" else 512


class TorchEngine:
    """Loads Llama / SmolLM / Qwen2 / Qwen3 models into our torch decoder."""

    name = "torch"

    def __init__(
        self,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        prefill_chunk_tokens: int | None = None,
        use_chat_template: bool = True,
        max_batch: int = 32,
        threads: int | None = None,
        quantize: Quantize = "none",
        prefix_cache_mb: int = 256,
        native_kernels: bool = True,
    ) -> None:
        """Configure the engine.

        Args:
            device: ``cpu`` or ``cuda:N``.
            dtype: ``auto`` (bf16; fp16 on GPUs without bf16), ``bfloat16``, ``float16`` or
                ``float32``.
            prefill_chunk_tokens: prompt tokens per forward pass while prefilling (None:
                `default_prefill_chunk` of the device).
            use_chat_template: false forces the ChatML template (``NEURON_USE_CHAT_TEMPLATE``).
            max_batch: sequences one model runs at once (more wait for a place).
            threads: on the CPU, torch's intra-op threads for the linear layers' matrix
                products (None: every core); everything else runs on one thread, so the event
                loop and the bus find a core free between products
                (`neuron.engines.torch_threads`).
            quantize: ``fp16`` / ``int8`` / ``int4``: linear weights as float16 (fbgemm, x86
                builds of torch) / int8 / int4, activations float32 (CPU only;
                `neuron.engines.torch_quant`); ``auto``: on a CPU without fast bfloat16, fp16
                where fbgemm is there, else int8; elsewhere as ``dtype``; ``none``.
            prefix_cache_mb: per model, KV cache of finished sequences kept for prompts that
                start the same way (`neuron.engines.torch_prefix`).
            native_kernels: on the CPU with float32 activations, decode attention, norms and
                (float16 or float32 weights) whole layers in the C kernels of
                `neuron.engines.torch_cpu_kernels` (built on first use; torch's and fbgemm's
                kernels where they cannot be).

        Raises:
            ValueError: an unknown device or dtype, a non-positive chunk size or thread count,
                or ``fp16`` weights where torch has no fbgemm.
        """
        self.device = torch.device(device)
        if prefill_chunk_tokens is None:
            prefill_chunk_tokens = default_prefill_chunk(self.device)
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be positive")
        self.dtype = resolve_dtype(dtype, self.device)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.use_chat_template = use_chat_template
        self.max_batch = max_batch
        if prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be >= 0")
        self.prefix_cache_mb = prefix_cache_mb
        self.native_kernels = native_kernels
        self.weights: WeightKind | None = None
        """How the linear layers keep their weights (None: as ``dtype``)."""
        if self.device.type == "cpu":
            match quantize:
                case "fp16" | "int8" | "int4":
                    self.weights = quantize
                case "auto":
                    if not cpu_has_fast_bf16():
                        self.weights = "fp16" if fbgemm_fp16_available() else "int8"
                case "none":
                    pass
                case _:
                    assert_never(quantize)
        if self.weights == "fp16" and not fbgemm_fp16_available():
            raise ValueError("quantize fp16 needs a torch build with fbgemm (x86); use int8")
        if self.weights is not None:
            self.dtype = torch.float32  # activations; linear weights are converted after loading
        if threads is not None and threads < 1:
            raise ValueError("threads must be at least 1")
        self.matmul_threads = threads or cpu_cores()
        """On the CPU, threads of the linear layers' matrix products (`ThreadSplit`)."""
        if self.device.type == "cpu":
            # every thread but a step loop's, during its products, stays on one: see
            # `neuron.engines.torch_threads` for why a loader's threads would slow those
            torch.set_num_threads(OTHER_THREADS)

    def load(self, files: ModelFiles, progress: ProgressCallback) -> TorchModel:
        """Load a model's tokenizer, chat template and weights; blocking.

        Raises:
            UnsupportedArchitectureError: the architecture, a feature or the GGUF vocabulary is
                not supported (raised before any weights are read).
            ModelLoadError: files missing or malformed, or the device is unavailable.
        """
        started = time.perf_counter()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {self.device} requested but CUDA is not available")
        progress(0.0, "reading configuration")
        tokenizer_config = _read_json(files.tokenizer_config)
        generation_config = _read_json(files.generation_config)

        def weights_progress(fraction: float, what: str) -> None:
            progress(_PREPARE_SHARE + (1 - _PREPARE_SHARE) * fraction, what)

        # Everything cheap (and every refusal) first, the weights last.
        if files.format == "gguf":
            prepared = self._prepare_gguf(files, tokenizer_config, generation_config)
        else:
            prepared = self._prepare_safetensors(files, tokenizer_config, generation_config)
        tokenizer, gguf_template, load_weights = prepared
        template = self._chat_template(files, tokenizer_config, gguf_template, tokenizer)
        model = load_weights(weights_progress)
        kernels: CpuKernels | None = None
        if self.device.type == "cpu":
            model.threads.configure(self.matmul_threads)
            if self.native_kernels and self.dtype == torch.float32:
                kernels = load_cpu_kernels()
        info = _model_info(files, model, self.device, self.dtype)
        product = None if kernels is None else kernels.panel_product
        if self.weights is not None:
            progress(0.99, f"converting the linear weights to {self.weights}")
            info = dataclasses.replace(info, memory_bytes=quantize(model, self.weights, product),
                                       dtype=f"{self.weights} (float32 activations)")
        elif product is not None:  # float32 weights: the kernel's sums, the same in any batch
            info = dataclasses.replace(info, memory_bytes=float32_panels(model, product))
        if kernels is not None:  # after the panels: whole layers need them
            model.use_cpu_kernels(kernels)
        logger.info(
            "loaded %s (%s, %s, %.1fM parameters, %.0f MiB, %s on %s) in %.2f s",
            files.model_id,
            files.format,
            info.architecture,
            info.parameters / 1e6,
            info.memory_bytes / 2**20,
            info.dtype,
            info.device,
            time.perf_counter() - started,
        )
        progress(1.0, "ready")
        return TorchModel(
            model=model,
            tokenizer=tokenizer,
            template=template,
            info=info,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            max_batch=self.max_batch,
            prefix_cache_mb=self.prefix_cache_mb,
        )

    def _prepare_safetensors(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        generation_config: Mapping[str, object] | None,
    ) -> tuple[Tokenizer, str | None, _WeightsLoader]:
        model_config = _read_json(files.config)
        if model_config is None:
            raise ModelLoadError(f"{files.model_id}: config.json is required for safetensors")
        if files.tokenizer is None:
            raise ModelLoadError(f"{files.model_id}: tokenizer.json is required for safetensors")
        if not files.weights:
            raise ModelLoadError(f"{files.model_id}: no safetensors shards")
        config = config_from_hf(model_config)
        tokenizer = Tokenizer.from_tokenizer_json(
            files.tokenizer,
            tokenizer_config=tokenizer_config,
            generation_config=generation_config,
            model_config=model_config,
        )

        def load_weights(progress: ProgressCallback) -> DecoderModel:
            return load_safetensors(
                config, files.weights, device=self.device, dtype=self.dtype, progress=progress
            )

        return tokenizer, None, load_weights

    def _prepare_gguf(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        generation_config: Mapping[str, object] | None,
    ) -> tuple[Tokenizer, str | None, _WeightsLoader]:
        if len(files.weights) != 1:
            raise ModelLoadError(f"{files.model_id}: expected exactly one .gguf file")
        reader = _open_gguf(files.weights[0])
        config = config_from_gguf(reader, frozenset(t.name for t in reader.tensors))
        if files.tokenizer is not None:
            tokenizer = Tokenizer.from_tokenizer_json(
                files.tokenizer,
                tokenizer_config=tokenizer_config,
                generation_config=generation_config,
            )
        else:
            tokenizer = Tokenizer.from_gguf_metadata(
                reader, tokenizer_config=tokenizer_config, generation_config=generation_config
            )
        template = gguf_value(reader, "tokenizer.chat_template")
        # The tensors only need the file's memory map; dropping the reader frees its parsed
        # metadata (the whole vocabulary as small arrays) before the weights are built.
        tensors = list(reader.tensors)
        del reader

        def load_weights(progress: ProgressCallback) -> DecoderModel:
            return load_gguf(
                tensors, config, device=self.device, dtype=self.dtype, progress=progress
            )

        return tokenizer, template if isinstance(template, str) else None, load_weights

    def _chat_template(
        self,
        files: ModelFiles,
        tokenizer_config: Mapping[str, object] | None,
        gguf_template: str | None,
        tokenizer: Tokenizer,
    ) -> ChatTemplate:
        try:
            template = ChatTemplate.resolve(
                chat_template_file=files.chat_template,
                tokenizer_config=tokenizer_config,
                gguf_template=gguf_template,
                special_tokens=tokenizer.special_tokens,
                use_model_template=self.use_chat_template,
            )
        except ChatTemplateError as exc:
            raise ModelLoadError(f"{files.model_id}: {exc}") from exc
        logger.debug("%s: chat template from %s", files.model_id, template.origin)
        return template


def _open_gguf(path: Path) -> GGUFFile:
    from gguf import GGUFReader

    try:
        reader: GGUFFile = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    return reader


def _model_info(
    files: ModelFiles, model: DecoderModel, device: torch.device, dtype: torch.dtype
) -> ModelInfo:
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights count once
    config = model.config
    return ModelInfo(
        model_id=files.model_id,
        engine=TorchEngine.name,
        format=files.format,
        architecture=config.architecture,
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        parameters=sum(p.numel() for p in unique),
        memory_bytes=sum(p.numel() * p.element_size() for p in unique),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


class TorchModel:
    """A model resident on a device (the `LoadedModel` of the torch engine)."""

    def __init__(
        self,
        *,
        model: DecoderModel,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        info: ModelInfo,
        prefill_chunk_tokens: int = 512,
        max_batch: int = 32,
        prefix_cache_mb: int = 0,
    ) -> None:
        """Wrap loaded parts and start the model's step loop; use `TorchEngine.load`."""
        self._model: DecoderModel | None = model
        self.tokenizer = tokenizer
        self.chat_template = template
        self._info = info
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._loop = BatchLoop(model, stop_ids=frozenset(tokenizer.stop_ids),
                               decode=tokenizer.decode, vocab_limit=tokenizer.vocab_size,
                               prefill_chunk_tokens=prefill_chunk_tokens, max_batch=max_batch,
                               prefix_retain_bytes=prefix_cache_mb * 2**20,
                               name=info.model_id)

    @property
    def info(self) -> ModelInfo:
        """Facts about the model."""
        return self._info

    @property
    def decoder(self) -> DecoderModel:
        """The torch module (for diagnostics and tests).

        Raises:
            ModelNotLoadedError: after `close`.
        """
        if self._model is None:
            raise ModelNotLoadedError(self._info.model_id)
        return self._model

    def render_chat(
        self,
        messages: Sequence[TemplateMessage],
        *,
        tools: Sequence[Mapping[str, object]] | None = None,
        template_kwargs: Mapping[str, TemplateValue] | None = None,
    ) -> str:
        """`ChatTemplate.render_or_chatml` with this model's template.

        Raises:
            ChatTemplateError: the template failed and tools were present (or ChatML failed too).
        """
        return self.chat_template.render_or_chatml(messages, tools=tools,
                                                   template_kwargs=template_kwargs)

    def encode(self, text: str) -> list[int]:
        """Tokenise rendered text without adding special tokens."""
        return self.tokenizer.encode(text)

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
        emit: Emit,
    ) -> None:
        """Queue a sequence on the model's step loop; see `BatchingModel.submit`.

        Raises:
            ValueError: an empty prompt, or ids outside the vocabulary.
            ModelNotLoadedError: after `close`.
        """
        vocab = self.decoder.config.vocab_size
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt ids must be in [0, {vocab})")
        self._loop.submit(prompt_ids, params, cancelled, emit)

    @property
    def batching(self) -> BatchStats:
        """What the step loop has done so far."""
        return self._loop.stats

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        cancelled: threading.Event,
    ) -> Iterator[Step | Finish]:
        """Generate from ``prompt_ids`` through the step loop, blocking the caller (any thread
        but the loop's); see `LoadedModel.generate`.

        Raises:
            ValueError: an empty prompt, or ids outside the vocabulary.
            ModelNotLoadedError: after `close`.
        """
        items: queue.SimpleQueue[Started | Step | Finish | BaseException] = queue.SimpleQueue()
        self.submit(prompt_ids, params, cancelled, items.put)
        return _drain(items)

    def close(self) -> None:
        """Stop the step loop, drop the weights and release device memory."""
        self._loop.close()
        device = self._model.embed_tokens.weight.device if self._model is not None else None
        self._model = None
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


def _drain(
    items: queue.SimpleQueue[Started | Step | Finish | BaseException],
) -> Iterator[Step | Finish]:
    while True:
        item = items.get()
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, Started):
            continue
        yield item
        if isinstance(item, Finish):
            return
