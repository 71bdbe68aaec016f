"""The inference engine: continuous batching over a paged KV cache."""
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.params import SamplingParams, StructuredOutputs

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutputs", "RequestOutput",
           "CompletionOutput"]
