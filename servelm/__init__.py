"""servelm: fast serving of generative language models."""
from servelm.config import EngineArgs
from servelm.engine.llm import LLM
from servelm.lora.request import LoRARequest
from servelm.outputs import CompletionOutput, Logprob, RequestOutput
from servelm.sampling_params import SamplingParams
from servelm.structured_output import StructuredOutputsParams

__version__ = "0.1.0"
__all__ = ["LLM", "EngineArgs", "SamplingParams", "StructuredOutputsParams", "RequestOutput",
           "CompletionOutput", "Logprob", "LoRARequest", "__version__"]
