"""Architecture names (as in config.json's `architectures`) to model classes."""
from torch import nn

from models.cohere import CohereForCausalLM
from models.llama import LlamaForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "OpenLlamaForCausalLM": LlamaForCausalLM,  # Llama plus flags in ModelConfig
    "CohereForCausalLM": CohereForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODELS:
        raise ValueError(f"unsupported architecture {architecture!r}; supported: {sorted(MODELS)}")
    return MODELS[architecture]
