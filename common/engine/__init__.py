from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.request import FinishReason, RequestError, RequestOutput, TokenLogprob

__all__ = [
    "EngineConfig",
    "FinishReason",
    "LLMEngine",
    "RequestError",
    "RequestOutput",
    "TokenLogprob",
]
