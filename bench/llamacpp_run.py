"""llama.cpp on one GGUF file, one stream at a time (bench/neuron_throughput.py's reference).

Runs under .bench-venv's Python, where llama-cpp-python is installed (built from source); never
imported by the project. The prompt is rendered with the GGUF's own chat template, as
llama-cpp-python's ``create_chat_completion`` renders it, then generated greedily with the
neuron's default repetition penalty (1.1 over the last 64 tokens) until ``--max-tokens`` or an
end-of-generation token. Each round starts from an empty KV cache (no prompt reuse), after one
unmeasured warm-up round. Prints one JSON object on the last line of stdout.

Times, per round: TTFT = render + tokenise + prefill + first token sampled; decode = first → last
token; total = render → last token. Every generated token is detokenised, as a server would.

Run:  .bench-venv/bin/python bench/llamacpp_run.py --model FILE.gguf --prompt "..." \
          [--max-tokens 128] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import time
from typing import Any

REPEAT_PENALTY = 1.1
REPEAT_WINDOW = 64
N_CTX = 2048


def one_round(llm: Any, formatter: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    llm.reset()  # no prompt reuse from the previous round: every round prefills in full
    started = time.perf_counter()
    rendered = formatter(messages=[{"role": "user", "content": prompt}])
    tokens = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special,
                          special=True)
    eog = llm.token_eos()
    first: float | None = None
    last = started
    count = 0
    finish = "length"
    pieces: list[bytes] = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                              repeat_penalty=REPEAT_PENALTY):
        if token == eog:
            finish = "stop"
            break
        pieces.append(llm.detokenize([token]))
        last = time.perf_counter()
        if first is None:
            first = last
        count += 1
        if count >= max_tokens:
            break
    return {
        "prompt_tokens": len(tokens),
        "tokens": count,
        "finish": finish,
        "ttft_s": (first if first is not None else last) - started,
        "decode_s": last - (first if first is not None else last),
        "total_s": last - started,
        "text": b"".join(pieces).decode(errors="replace"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    llama_cpp = importlib.import_module("llama_cpp")
    chat_format = importlib.import_module("llama_cpp.llama_chat_format")
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=N_CTX, n_threads=args.threads,
                          n_threads_batch=args.threads, last_n_tokens_size=REPEAT_WINDOW,
                          verbose=False)
    load_s = time.perf_counter() - started
    eos, bos = llm.token_eos(), llm.token_bos()
    formatter = chat_format.Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=llm.detokenize([eos], special=True).decode() if eos != -1 else "",
        bos_token=llm.detokenize([bos], special=True).decode() if bos != -1 else "",
        stop_token_ids=[eos],
    )
    one_round(llm, formatter, args.prompt, args.max_tokens)  # warm-up
    rounds = [one_round(llm, formatter, args.prompt, args.max_tokens) for _ in range(args.rounds)]
    print(json.dumps({
        "version": importlib.metadata.version("llama-cpp-python"),
        "threads": args.threads,
        "n_ctx": N_CTX,
        "load_s": load_s,
        "repeat_penalty": REPEAT_PENALTY,
        "repeat_window": REPEAT_WINDOW,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "rounds": rounds,
    }))


if __name__ == "__main__":
    main()
