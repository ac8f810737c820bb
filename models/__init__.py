"""Model definitions, the architecture registry and weight loading.

Architectures are imported lazily: naming one here costs nothing until it is built."""

import importlib

from .attention import AttentionMetadata, attention_context

# Hugging Face `architectures` entry -> (module in this package, class name).
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "LlamaForCausalLM"),
    "BertModel": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
}
POOLING_ARCHITECTURES = {"BertModel", "BertForSequenceClassification"}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def model_class(architecture: str) -> type:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture {architecture!r} is not supported by kiln; supported: "
            f"{', '.join(supported_architectures())}"
        )
    module, name = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = ["ARCHITECTURES", "POOLING_ARCHITECTURES", "AttentionMetadata", "attention_context",
           "model_class", "supported_architectures"]
