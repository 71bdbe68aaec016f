"""The GPU benchmark: a random-weight model of Llama-2-7B's shape in bfloat16, built in memory (nothing to download),
through the offline API at 1, 64 and 256 sequences, beside transformers' `generate` on the same weights in the same
run.

    python -m engine.bench_cuda [--prompt-len 512] [--new-tokens 128] [--batches 1 64 256] [--layers 32]
    python -m engine.bench_cuda --device cpu --tiny --layers 2 --prompt-len 24 --new-tokens 4 --batches 1 3 \
        --transformers-batches 1 3          # a smoke test of the script without a GPU (tests/test_cuda_graphs.py)

transformers builds the model with its own random initialisation; ours loads its shape with `--load-format dummy` and
then takes transformers' tensors through the same loader a checkpoint goes through. transformers runs first (1 and 64
sequences), then ours. It prints output tokens per second (all tokens over the whole run, prefill included), one
sequence's decode rate against the bound that the GPU's memory bandwidth sets (every weight read once per token,
bandwidth measured by a copy), and each target of issue #19. Below a target it prints where a decode step's time goes
(the profiler's top kernels)."""
import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from engine import LLM
from engine.bench import generate, run_transformers

LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=256, intermediate_size=688, num_attention_heads=2, num_key_value_heads=2)
BOS, EOS = 1, 2
TARGET_BANDWIDTH_SHARE, TARGET_TOKENS_AT_256, TARGET_RATIO_AT_64 = 0.6, 5000, 3.0


def write_checkpoint_folder(folder: Path, hf_config) -> Path:
    """A checkpoint folder without weights (for `--load-format dummy`): the config, and a tokenizer whose every id
    is a word of its own ("<0>" .. "<vocab - 1>"), so that any token the random model draws decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf_config.save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(hf_config.vocab_size)}, unk_token="<0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": f"<{BOS}>", "eos_token": f"<{EOS}>"}))
    return folder


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Random ids after BOS: no two prompts share a KV block, so the prefix cache serves none."""
    generator = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, vocab, (length - 1,), generator=generator).tolist() for _ in range(count)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy of 2 GiB (256 MiB on the CPU) moves, counting reads and writes."""
    source = torch.empty(2**30 if device.type == "cuda" else 2**27, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    return 10 * 2 * source.numel() * source.element_size() / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(llm: LLM, prompt: list[int], new_tokens: int) -> float:
    """Tokens per second of one sequence after its first token (prefill excluded)."""
    outputs, _ = generate(llm, [prompt], new_tokens)
    metrics = outputs[0].metrics
    return (new_tokens - 1) / (metrics.finished_time - metrics.first_token_time)


def profile_decode(llm: LLM, prompts: list[list[int]]) -> None:
    """The profiler's top kernels over a few decode steps of `len(prompts)` sequences."""
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams
    engine = llm.engine
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    while not all(choices[0].num_output_tokens >= 3 for choices in engine.requests.values()):  # prompts done
        engine.step()
    cuda = engine.runner.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(5):
            engine.step()
        synchronize(engine.runner.device)
    while engine.has_unfinished_requests():
        engine.step()
    print(f"where 5 decode steps of {len(prompts)} sequences spend their time:")
    print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20,
                                    max_name_column_width=70))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--transformers-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--layers", type=int, default=LLAMA_2_7B["num_hidden_layers"], help="fewer: a quick try")
    parser.add_argument("--enforce-eager", action="store_true", help="ours without CUDA graphs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of this script (float32, the PyTorch path; use --tiny)")
    parser.add_argument("--tiny", action="store_true", help="Llama-2-7B's vocabulary and head size, 256 wide")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(environment(device), flush=True)
    config = LlamaConfig(**{**LLAMA_2_7B, **(TINY if args.tiny else {}), "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    vocab, length, new = config.vocab_size, args.prompt_len, args.new_tokens
    theirs = {}
    run_transformers(hf, random_prompts(2, 16, vocab, seed=1), 4, EOS)  # warm-up
    for batch in args.transformers_batches:
        theirs[batch] = run_transformers(hf, random_prompts(batch, length, vocab, seed=batch), new, EOS)
        print(f"transformers generate, {batch} sequences: {theirs[batch]:.1f} output tokens/s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what generate's caches held: the KV cache is sized from the free memory
    with tempfile.TemporaryDirectory() as folder:
        llm = LLM(str(write_checkpoint_folder(Path(folder), config)), load_format="dummy",
                  dtype=str(dtype).removeprefix("torch."), device=args.device,
                  kernel_backend="auto" if device.type == "cuda" else "torch", max_num_seqs=max(args.batches),
                  max_model_len=length + new + 16, enforce_eager=args.enforce_eager,
                  num_kv_blocks=max(args.batches) * -(-(length + new + 16) // 16))  # every sequence at once
    llm.engine.runner.model.load_weights(hf.named_parameters())  # in place: the recorded graphs still hold
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report_ours(llm, args, vocab, theirs)


def environment(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU, torch {torch.__version__}: a smoke test, no figures to read"
    import triton
    return (f"GPU {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"Triton {triton.__version__}")


def report_ours(llm: LLM, args: argparse.Namespace, vocab: int, theirs: dict[int, float]) -> None:
    runner, length, new = llm.engine.runner, args.prompt_len, args.new_tokens
    attention = runner.model.model.layers[0].self_attn.attn.decode_kernel
    print(f"ours: attention {type(attention).__name__ if attention else 'PyTorch path'}, CUDA graphs for "
          f"{runner.graphs.sizes if runner.graphs else 'none'}, KV cache {runner.num_blocks} blocks", flush=True)
    generate(llm, random_prompts(4, length, vocab, seed=2), 8)  # warm-up: Triton compiles its prompt tiles
    weight_bytes = sum(p.numel() * p.element_size() for name, p in runner.model.named_parameters()
                       if "embed_tokens" not in name)  # a token reads one row of the embedding
    bound = copy_bandwidth(runner.device) / weight_bytes
    one = decode_rate(llm, random_prompts(1, length, vocab, seed=3)[0], new)
    print(f"1 sequence decodes {one:.1f} tokens/s: {one / bound:.0%} of the bandwidth bound, {bound:.0f} tokens/s "
          f"({weight_bytes / 1e9:.1f} GB of weights a token)", flush=True)
    ours = {}
    for batch in args.batches:
        _, elapsed = generate(llm, random_prompts(batch, length, vocab, seed=100 + batch), new)
        ours[batch] = batch * new / elapsed
        ratio = f", {ours[batch] / theirs[batch]:.2f}x transformers" if batch in theirs else ""
        print(f"ours, {batch} sequences: {ours[batch]:.1f} output tokens/s{ratio}", flush=True)
    checks = {f"1 sequence at >= {TARGET_BANDWIDTH_SHARE:.0%} of the bandwidth bound":
              one >= TARGET_BANDWIDTH_SHARE * bound,
              f">= {TARGET_TOKENS_AT_256} tokens/s at 256": ours.get(256, 0) >= TARGET_TOKENS_AT_256,
              f">= {TARGET_RATIO_AT_64}x transformers at 64":
              ours.get(64, 0) >= TARGET_RATIO_AT_64 * theirs.get(64, float("inf"))}
    for target, met in checks.items():
        print(f"target {target}: {'met' if met else 'BELOW'}")
    if not all(checks.values()):
        profile_decode(llm, random_prompts(max(args.batches), length, vocab, seed=7))


if __name__ == "__main__":
    main()
