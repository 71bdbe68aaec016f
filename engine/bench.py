"""Throughput against transformers' `generate`, same model and machine, in one run.

    python -m engine.bench [--model PATH] [--requests 64] [--prompt-len 100] [--new-tokens 128]

Needs the test extra (transformers, accelerate). Prints generated tokens per second of both and
their ratio, for a batch of requests and for a single request: the median of `--repeats` runs, ours
and theirs alternating so that a busy machine slows both alike. The last column is a ceiling: the
tokens per second that the run's matrix products alone allow on this machine, computed as the engine
computes them (every float32 engine pays for them), so that the ratio can be read against the best one
possible. Prefix caching has a benchmark of its own: `python -m engine.bench_prefix`.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from models.default_model import resolve_model
from models.options import QUANTIZATIONS

_TEXT = ("The history of computing is a story of people who wanted to think faster than their tools "
         "allowed. From the abacus to the mechanical calculators of the seventeenth century, from "
         "punched cards to vacuum tubes and transistors, each generation built machines that made the "
         "previous generation's hardest problems routine. ")


def make_prompts(tokenizer, count: int, length: int, tag: str = "prompt") -> list[list[int]]:
    """`count` prompts of exactly `length` tokens, each begun by `tag` and its number ("prompt 7: The history of
    ..."). No two begin alike, in one call or across calls with different tags, so they share no KV block: the
    prefix cache serves none of them from another."""
    text = _TEXT * (1 + 2 * length // len(_TEXT.split()))
    return [tokenizer.encode(f"{tag} {i}: {text}", add_special_tokens=False)[:length] for i in range(count)]


def generate(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[list[RequestOutput], float]:
    """Exactly `new_tokens` greedy tokens for each prompt, in one batch: the outputs and the seconds it took."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return outputs, elapsed


def run_ours(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    _, elapsed = generate(llm, prompts, new_tokens)
    return len(prompts) * new_tokens / elapsed


def run_transformers(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    """Batched and left-padded, as transformers documents batched generation, on the model's device."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, pad_token_id=pad_id,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if out.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / elapsed


@torch.inference_mode()
def matmul_ceiling(model: nn.Module, requests: int, prompt_len: int, new_tokens: int, step_tokens: int) -> float:
    """Tokens/s if the run were its matrix products alone: the layers' projections timed on one prefill
    step (of `step_tokens` rows at most) and one decode step, the output head on one step's rows, scaled to the whole run."""
    linears = [m for m in model.model.modules() if isinstance(m, nn.Linear)]  # the decoder's, not the head
    hidden = model.config.hidden_size

    def seconds(work) -> float:
        work()
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            work()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    def layers(rows: int) -> float:
        inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
        return seconds(lambda: [m(inputs[m.in_features]) for m in linears])

    prompt_tokens = requests * prompt_len
    chunk = min(prompt_tokens, step_tokens)
    head = seconds(lambda: model.compute_logits(torch.randn(requests, hidden)))
    total = (prompt_tokens / chunk * layers(chunk) + (new_tokens - 1) * layers(requests) + new_tokens * head)
    return requests * new_tokens / total


def workload_args(doc: str) -> argparse.Namespace:
    """The flags the throughput benchmarks share: the model and the batch they run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: SmolLM2)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                        help="the linear weights ours runs (auto: a quantized GGUF's as they are; none: float32)")
    return parser.parse_args()


def main() -> None:
    args = workload_args(__doc__)
    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    llm = LLM(str(path), dtype="float32", device="cpu", quantization=args.quantization)
    hf_args = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    hf = AutoModelForCausalLM.from_pretrained(path.parent if hf_args else path, dtype=torch.float32, **hf_args).eval()
    tokenizer = llm.get_tokenizer()
    pad_id = tokenizer.eos_token_ids[0]
    warm_up = make_prompts(tokenizer, 2, args.prompt_len, tag="warm-up")
    run_ours(llm, warm_up, 4)
    run_transformers(hf, warm_up, 4, pad_id)
    print(f"model {Path(path).name}, {torch.get_num_threads()} threads, prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens each (ignore_eos), on the CPU, ours with --quantization {args.quantization}, "
          f"transformers in float32")
    print(f"{'case':<12}{'ours tok/s':>12}{'transformers tok/s':>20}{'ratio':>8}"
          f"{'matmul ceiling':>16}{'its ratio':>10}")
    model = llm.engine.runner.model
    step_tokens = llm.engine.scheduler.config.max_num_batched_tokens  # prompts are computed in steps of this many
    for name, count in ((f"{args.requests} requests", args.requests), ("1 request", 1)):
        runs = []
        for repeat in range(args.repeats):
            # New prompts each run: the prefix cache (on by default) would serve a repeat from the run before, and
            # transformers has no cache to do the same.
            batch = make_prompts(tokenizer, count, args.prompt_len, tag=f"{name}, run {repeat}, prompt")
            runs.append((run_ours(llm, batch, args.new_tokens), run_transformers(hf, batch, args.new_tokens, pad_id),
                         matmul_ceiling(model, count, args.prompt_len, args.new_tokens, step_tokens)))
        ours, theirs, ceiling = (statistics.median(r[i] for r in runs) for i in (0, 1, 2))
        print(f"{name:<12}{ours:>12.1f}{theirs:>20.1f}{ours / theirs:>7.2f}x{ceiling:>16.1f}{ceiling / theirs:>9.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
