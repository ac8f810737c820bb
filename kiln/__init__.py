"""kiln: an offline LLM inference engine with vLLM's offline API."""

import logging

from .llm import LLM
from .runtime.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from .runtime.outputs import CompletionOutput, Logprob, RequestOutput
from .runtime.pooling import PoolingParams
from .runtime.sampling_params import SamplingParams
from .runtime.structured_output import StructuredOutputsParams

logging.getLogger("kiln").addHandler(logging.NullHandler())

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence",
           "CompletionOutput", "Logprob", "PoolingParams", "RequestOutput",
           "SamplingParams", "StructuredOutputsParams"]
__version__ = "0.1.0"
