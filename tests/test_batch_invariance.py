"""Greedy output does not depend on batching, arrival times, block size or preemption; no block leaks."""
import pytest

from engine import LLM, SamplingParams
from tests.conftest import CHAT_QUESTIONS, chat_prompt

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(llm):
    """16 prompts from 3 to about 150 tokens."""
    tokenizer = llm.get_tokenizer()
    chats = [tokenizer.encode(chat_prompt(q)) for q in CHAT_QUESTIONS]
    text = tokenizer.encode(" ".join(CHAT_QUESTIONS * 8), add_special_tokens=False)
    return chats + [text[i * 7: i * 7 + n] for i, n in enumerate((3, 9, 17, 33, 64, 100, 128, 150))]


@pytest.fixture(scope="module")
def alone(llm, prompts):
    return [llm.generate(p, PARAMS)[0].outputs[0].token_ids for p in prompts]


def _staggered(engine, prompts, every: int) -> dict[str, list[int]]:
    """Add one request every `every` steps while the others run."""
    pending, results, step = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            index, prompt = pending.pop(0)
            engine.add_request(prompt, PARAMS, request_id=str(index))
        results.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        _assert_blocks_held_or_free(engine)
        step += 1
    return results


def _assert_blocks_held_or_free(engine) -> None:
    """Between steps, each block is either free (empty or cached) or held by sequences, never both."""
    held = {block for choices in engine.requests.values() for seq in choices for block in seq.block_table}
    assert len(held) + engine.pool.num_free == engine.pool.num_blocks


# The first case also cuts prefill steps into forward passes of at most 100 tokens (on the CPU a step of more
# than 2048 runs as several; no other test reaches that).
@pytest.mark.parametrize("block_size,num_blocks,tokens_per_forward", [(16, 30, 100), (1, 450, None)])
def test_same_tokens_together_staggered_and_preempted(default_model_path, prompts, alone, block_size, num_blocks,
                                                      tokens_per_forward):
    llm = LLM(str(default_model_path), block_size=block_size, num_kv_blocks=num_blocks)
    engine = llm.engine
    engine.runner.tokens_per_forward = tokens_per_forward or engine.runner.tokens_per_forward
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]
    assert engine.scheduler.num_preemptions > 0, "the cache should be small enough to force preemption"
    assert together == alone
    staggered = _staggered(engine, prompts, every=2)
    assert [staggered[str(i)] for i in range(len(prompts))] == alone
    assert engine.pool.num_free == num_blocks
    assert not engine.requests
