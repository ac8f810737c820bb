"""kiln: an offline LLM inference engine with vLLM's offline API."""

import logging

from .llm import LLM
from .runtime.outputs import CompletionOutput, Logprob, RequestOutput
from .runtime.sampling_params import SamplingParams

logging.getLogger("kiln").addHandler(logging.NullHandler())

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
