"""`ThreadSplit`: the linear layers' products on more threads, everything else on one, and the
same numbers either way."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from neuron.engines.torch_decoder import RowPlan
from neuron.engines.torch_engine import TorchEngine
from neuron.engines.torch_quant import Fp16Linear, Int4Linear, Int8Linear, fbgemm_fp16_available
from neuron.engines.torch_threads import ThreadSplit, cpu_cores
from tests.support.tiny_models import build_tiny_llama


def _layer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True)
    match kind:
        case "float32":
            return linear
        case "fp16":
            if not fbgemm_fp16_available():
                pytest.skip("this torch build has no fbgemm")
            return Fp16Linear(linear)
        case "int8":
            return Int8Linear(linear, RowPlan())
        case _:
            return Int4Linear(linear, RowPlan())


@pytest.mark.parametrize("kind", ["float32", "fp16", "int8", "int4"])
def test_more_threads_for_a_product_change_no_number(kind: str) -> None:
    layer = _layer(kind)
    x = torch.randn(48, 256)
    one, two = ThreadSplit(), ThreadSplit()
    two.configure(2)
    with torch.inference_mode():
        for rows in (1, 3, 16, 48):
            assert torch.equal(two.run(layer, x[:rows]), one.run(layer, x[:rows])), rows


def test_the_calling_thread_is_back_on_other_threads_after_a_product() -> None:
    split = ThreadSplit()
    split.configure(2)
    assert torch.get_num_threads() == 1  # configure puts the loading thread on `other`
    seen: list[int] = []

    def product(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        raise RuntimeError("the product failed")

    def step_loop() -> None:
        with pytest.raises(RuntimeError):
            split.run(product, torch.zeros(1))
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=step_loop)
    thread.start()
    thread.join()
    assert seen == [2, 1]


def test_thread_counts_are_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThreadSplit().configure(0)


def _ignore(fraction: float, what: str) -> None:
    del fraction, what


def test_the_engine_gives_a_cpu_decoder_every_core_for_its_products_alike(
        tmp_path: Path) -> None:
    tiny = build_tiny_llama(tmp_path)
    default = TorchEngine(quantize="auto").load(tiny.safetensors_files(), _ignore)
    one = TorchEngine(quantize="auto", threads=1).load(tiny.safetensors_files(), _ignore)
    try:
        assert default.decoder.threads.matmul == cpu_cores()
        assert (one.decoder.threads.matmul, one.decoder.threads.other) == (1, 1)
        assert torch.get_num_threads() == 1
        prompt = torch.arange(3, 40)
        with torch.inference_mode():
            logits = [model.decoder(prompt, [model.decoder.new_cache(64)], [len(prompt)],
                                    all_logits=True) for model in (default, one)]
        assert torch.equal(logits[0], logits[1])
    finally:
        default.close()
        one.close()
