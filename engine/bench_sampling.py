"""What logprobs, penalties and a bias cost: the same batch with and without them, in one run.

    python -m engine.bench_sampling [--model PATH] [--requests 64] [--prompt-len 100] [--new-tokens 128]

Both runs generate exactly `--new-tokens` tokens per request (ignore_eos), at temperature 0.8 with a seed. The
controlled run asks each request for logprobs with the top 5, presence, frequency and repetition penalties, and a
logit bias. Plain and controlled runs alternate (`--repeats` each, new prompts every run, so that the prefix cache
serves nothing; which goes first alternates too) and the table gives each run's generated tokens per second, the median ratio and its spread, and
the share of the steps' time spent in the sampler (its controls and logprobs included).
"""
import statistics
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.bench import make_prompts, workload_args
from models.default_model import resolve_model

CONTROLS = dict(logprobs=5, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1,
                logit_bias={13: 2.0, 28: -1.5, 30: 1.0})


class TimedSampler:
    """Wraps the engine's sampler and the step, adding up the seconds of each."""

    def __init__(self, llm: LLM):
        engine = llm.engine
        self.sampler, self.step = engine.sampler, engine.step
        self.sampling = self.stepping = 0.0
        engine.sampler, engine.step = self._sample, self._step

    def _sample(self, *args):
        start = time.perf_counter()
        try:
            return self.sampler(*args)
        finally:
            self.sampling += time.perf_counter() - start

    def _step(self):
        start = time.perf_counter()
        try:
            return self.step()
        finally:
            self.stepping += time.perf_counter() - start

    def share(self) -> float:
        share = self.sampling / self.stepping
        self.sampling = self.stepping = 0.0
        return share


def run(llm: LLM, timer: TimedSampler, prompts: list[list[int]], new_tokens: int, controls: dict):
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=new_tokens, ignore_eos=True, **controls)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
    return len(prompts) * new_tokens / elapsed, timer.share()


def main() -> None:
    args = workload_args(__doc__)
    path = resolve_model(args.model)
    llm = LLM(str(path), dtype="float32", device="cpu", quantization=args.quantization)
    timer = TimedSampler(llm)
    tokenizer = llm.get_tokenizer()
    run(llm, timer, make_prompts(tokenizer, 2, args.prompt_len, tag="warm-up"), 4, CONTROLS)
    print(f"model {Path(path).name}, {torch.get_num_threads()} threads, {args.requests} requests, prompts of "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens each; controls: {CONTROLS}")
    print(f"{'run':<6}{'plain tok/s':>14}{'sampler share':>16}{'controlled tok/s':>19}{'sampler share':>16}"
          f"{'ratio':>8}")
    ratios = []
    for repeat in range(args.repeats):
        results = {}
        for name in ("plain", "controlled") if repeat % 2 == 0 else ("controlled", "plain"):  # neither always first
            prompts = make_prompts(tokenizer, args.requests, args.prompt_len, tag=f"{name} {repeat}")
            results[name] = run(llm, timer, prompts, args.new_tokens, CONTROLS if name == "controlled" else {})
        (plain, plain_share), (controlled, share) = results["plain"], results["controlled"]
        ratios.append(controlled / plain)
        print(f"{repeat:<6}{plain:>14.1f}{plain_share:>15.1%}{controlled:>19.1f}{share:>15.1%}"
              f"{controlled / plain:>7.3f}x", flush=True)
    print(f"controlled / plain: median {statistics.median(ratios):.3f}x (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
