"""What a JSON schema costs: a batch constrained by one against the same batch without, in one run; and the time to
compile a schema, cold and cached.

    python -m engine.bench_structured [--model PATH] [--requests 64] [--prompt-len 100] [--new-tokens 128]

Both runs generate exactly `--new-tokens` tokens per request at temperature 0.8 with a seed: the plain run with
ignore_eos, the constrained one under a schema whose array needs more tokens than that (an order of at least 40
items), so that max_tokens ends it too. The runs alternate (`--repeats` each, new prompts every run, which goes first
alternating as well); the table gives each run's generated tokens per second, their ratio, the median ratio and its
spread, and the share of the steps' time spent in the sampler (the grammar masks included).
"""
import statistics
import time
import uuid
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.bench import make_prompts, workload_args
from engine.bench_sampling import TimedSampler
from engine.params import StructuredOutputs
from models.default_model import resolve_model

ITEM = {"type": "object", "properties": {
    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": {"type": "string", "maxLength": 40},
    "quantity": {"type": "integer", "minimum": 1}, "colour": {"enum": ["red", "green", "blue", "black"]},
    "gift": {"type": "boolean"}}, "required": ["sku", "name", "quantity", "colour", "gift"],
    "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                 "required": ["name", "email"], "additionalProperties": False},
    "items": {"type": "array", "items": ITEM, "minItems": 40}},
    "required": ["customer", "items"], "additionalProperties": False}


def run(llm: LLM, timer: TimedSampler, prompts: list[list[int]], new_tokens: int, constrained: bool):
    spec = StructuredOutputs(json=ORDER) if constrained else None
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=new_tokens, ignore_eos=not constrained,
                            structured_outputs=spec)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return len(prompts) * new_tokens / elapsed, timer.share()


def compile_times(llm: LLM) -> tuple[float, float, float]:
    """Seconds to compile the order schema the first time (made new by a unique title) and from the cache, and to
    build the library's view of the vocabulary, which the first schema of a server's life pays for once."""
    grammars = llm.engine.grammars
    start = time.perf_counter()
    grammars.compile(StructuredOutputs(json_object=True))
    vocabulary = time.perf_counter() - start
    spec = StructuredOutputs(json={**ORDER, "title": uuid.uuid4().hex})
    times = []
    for _ in range(2):
        start = time.perf_counter()
        grammars.matchers(spec, 1)  # what a request pays: the compiled grammar (or the cache's) and its own copy
        times.append(time.perf_counter() - start)
    return times[0], times[1], vocabulary


def main() -> None:
    args = workload_args(__doc__)
    path = resolve_model(args.model)
    llm = LLM(str(path), dtype="float32", device="cpu", quantization=args.quantization)
    cold, cached, vocabulary = compile_times(llm)
    print(f"compiling the schema: {cold * 1e3:.2f} ms cold, {cached * 1e3:.3f} ms cached; the vocabulary, once per "
          f"server: {vocabulary * 1e3:.0f} ms")
    timer = TimedSampler(llm)
    tokenizer = llm.get_tokenizer()
    for constrained in (False, True):
        run(llm, timer, make_prompts(tokenizer, 2, args.prompt_len, tag=f"warm-up {constrained}"), 4, constrained)
    print(f"model {Path(path).name}, {torch.get_num_threads()} threads, {args.requests} requests, prompts of "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens each")
    print(f"{'run':<6}{'plain tok/s':>14}{'sampler share':>16}{'schema tok/s':>15}{'sampler share':>16}{'ratio':>8}")
    ratios = []
    for repeat in range(args.repeats):
        results = {}
        for name in ("plain", "schema") if repeat % 2 == 0 else ("schema", "plain"):  # neither always first
            prompts = make_prompts(tokenizer, args.requests, args.prompt_len, tag=f"{name} {repeat}")
            results[name] = run(llm, timer, prompts, args.new_tokens, name == "schema")
        (plain, plain_share), (schema, share) = results["plain"], results["schema"]
        ratios.append(schema / plain)
        print(f"{repeat:<6}{plain:>14.1f}{plain_share:>15.1%}{schema:>15.1f}{share:>15.1%}{schema / plain:>7.3f}x",
              flush=True)
    print(f"schema / plain: median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
