"""The offline Python API, shaped like vLLM's: `LLM(model=...).generate(prompts, sampling_params)`."""
from dataclasses import fields

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.params import SamplingParams
from engine.worker import serve_if_torchrun_worker

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_args):
        known = {f.name for f in fields(EngineConfig)}
        if unknown := set(engine_args) - known:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        config = EngineConfig(model=model, **engine_args)
        serve_if_torchrun_worker(config)
        self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs come back in the order of the prompts. However the call
        ends (a refused prompt, an interrupt), none of its prompts stays queued."""
        if isinstance(prompts, str) or (len(prompts) and not hasattr(prompts[0], "__len__")):
            prompts = [prompts]  # one prompt: text, or token ids (numbers: nothing with a length)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
            finished: dict[str, RequestOutput] = {}
            while self.engine.has_unfinished_requests():
                finished.update((out.request_id, out) for out in self.engine.step() if out.finished)
            return [finished[i] for i in ids]
        except BaseException:
            for request_id in ids:  # finished ones are gone already: aborting them does nothing
                self.engine.abort(request_id)
            raise

