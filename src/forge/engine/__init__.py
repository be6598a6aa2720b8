"""forge's built-in inference engine: paged KV cache, continuous batching, CUDA graphs.

`LLMEngine(model, EngineConfig(...))` generates from token ids; `forge.actors.Generator`
wraps it as a service that takes text / chat messages and returns `Completion`s.
"""

from forge.engine.config import EngineConfig, SamplingParams
from forge.engine.engine import LLMEngine
from forge.engine.sequence import RequestOutput, SampleOutput

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "SampleOutput", "SamplingParams"]
