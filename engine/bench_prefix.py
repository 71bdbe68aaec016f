"""Prefix caching in one run: time to first token of a chat workload, cold and cached, and what the cache costs
when nothing hits.

    python -m engine.bench_prefix [--model PATH] [--system-len 2000] [--chat-repeats 5]
                                  [--requests 64] [--prompt-len 100] [--new-tokens 128] [--repeats 3]

Chat: each request is a long system prompt, then a short user turn of its own, as a chat client sends them. Each
repeat takes a system prompt that no request has sent before and sends it twice, with two different user turns:
the first request computes its whole prompt (cold), the second finds the system prompt's blocks in the cache
(cached). Time to first token is the engine's own (arrival to first token) for one request alone, one new token.
The target: cached at most 10% of cold.

Throughput: the workload of `python -m engine.bench` (distinct prompts, greedy, ignore_eos), with new prompts
each run so that nothing hits, through an engine with prefix caching and one without, in alternation. The cache
must cost nothing here.

Each line prints the median and the range (min-max) over the repeats; ratios are taken within each repeat's pair,
then summarized alike. The cached-token counts (one per request or run) show what hit. Float32 on the CPU, as
engine.bench runs; it prints and asserts nothing about time.
"""
import argparse
import statistics

import torch

from engine import LLM
from engine.bench import generate, make_prompts
from models.default_model import resolve_model

USER_TURNS = ("Who built the first mechanical calculator?", "Why did transistors replace vacuum tubes?")


def chat_prompt(tokenizer, system: list[int], user_turn: str) -> list[int]:
    """The system prompt, then a user turn and the assistant's cue. Joined as token ids, not text, so that every
    request with this system prompt begins with exactly its tokens."""
    return system + tokenizer.encode(f"\nUser: {user_turn}\nAssistant:", add_special_tokens=False)


def time_to_first_token(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    """One request alone: seconds from its arrival to its first token, and how many prompt tokens the cache gave."""
    [output], _ = generate(llm, [prompt], 1)
    return output.metrics.first_token_time - output.metrics.arrival_time, output.num_cached_tokens


def chat(llm: LLM, system_len: int, repeats: int) -> list[list[tuple[float, int]]]:
    """Per repeat, (seconds, cached tokens) of the cold request and of the cached one."""
    tokenizer = llm.get_tokenizer()
    systems = make_prompts(tokenizer, repeats + 1, system_len, tag="system prompt")  # never sent before
    runs = [[time_to_first_token(llm, chat_prompt(tokenizer, system, turn)) for turn in USER_TURNS]
            for system in systems]
    return runs[1:]  # the first repeat pays for the first long prompt's lazy set-up


def throughput(llms: list[LLM], requests: int, prompt_len: int, new_tokens: int,
               repeats: int) -> list[list[tuple[float, int]]]:
    """Per run, (tokens/s, cached tokens) of each engine, the engines in turn so that a busy machine slows all."""
    runs = []
    for repeat in range(repeats):
        prompts = make_prompts(llms[0].get_tokenizer(), requests, prompt_len, tag=f"run {repeat}, prompt")
        pairs = []
        for llm in llms:
            outputs, seconds = generate(llm, prompts, new_tokens)
            pairs.append((requests * new_tokens / seconds, sum(o.num_cached_tokens for o in outputs)))
        runs.append(pairs)
    return runs


def per_case(runs: list[list[tuple[float, int]]]) -> list[tuple[list[float], list[int]]]:
    """Runs of (value, cached tokens) for each case, turned into cases of (values, cached tokens) over the runs."""
    return [tuple(map(list, zip(*case))) for case in zip(*runs)]


def spread(values: list[float], fmt: str) -> str:
    """The median, then the range: how far one run of this machine can be trusted."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def print_row(name: str, values: list[float], fmt: str, unit: str, cached: list[int] | None = None) -> None:
    hits = f"cached tokens: {' '.join(map(str, cached))}" if cached is not None else ""
    print(f"  {name:<16}{spread(values, fmt):>24} {unit:<7}{hits}".rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf file (default: SmolLM2)")
    parser.add_argument("--system-len", type=int, default=2000, help="tokens of the shared system prompt")
    parser.add_argument("--chat-repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs of each engine")
    args = parser.parse_args()

    path = resolve_model(args.model)
    cache_on, cache_off = (LLM(str(path), dtype="float32", device="cpu", enable_prefix_caching=caching)
                           for caching in (True, False))
    for llm in (cache_on, cache_off):
        generate(llm, make_prompts(llm.get_tokenizer(), 2, args.prompt_len, tag="warm-up"), 4)
    print(f"model {path.name}, {torch.get_num_threads()} threads, float32 on the CPU")

    print(f"chat: system prompts of {args.system_len} tokens, each sent twice with a different user turn, "
          f"one request at a time, 1 new token; {args.chat_repeats} repeats")
    (cold, cold_hits), (cached, cached_hits) = per_case(chat(cache_on, args.system_len, args.chat_repeats))
    print_row("TTFT cold", [s * 1000 for s in cold], ".0f", "ms", cold_hits)
    print_row("TTFT cached", [s * 1000 for s in cached], ".1f", "ms", cached_hits)
    print_row("cached / cold", [100 * c / k for c, k in zip(cached, cold)], ".1f", "%")

    print(f"throughput: {args.requests} requests, prompts of {args.prompt_len} tokens (new ones each run), "
          f"{args.new_tokens} new tokens each (ignore_eos); {args.repeats} runs, caching on and off in turn")
    runs = throughput([cache_on, cache_off], args.requests, args.prompt_len, args.new_tokens, args.repeats)
    (on, on_hits), (off, off_hits) = per_case(runs)
    print_row("caching on", on, ".1f", "tok/s", on_hits)
    print_row("caching off", off, ".1f", "tok/s", off_hits)
    print_row("on / off", [a / b for a, b in zip(on, off)], ".3f", "x")


if __name__ == "__main__":
    main()
