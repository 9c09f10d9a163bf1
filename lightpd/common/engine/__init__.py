from lightpd.common.engine.config import EngineConfig
from lightpd.common.engine.llm_engine import LLMEngine
from lightpd.common.engine.request import FinishReason, RequestError, RequestOutput, TokenLogprob

__all__ = [
    "EngineConfig",
    "FinishReason",
    "LLMEngine",
    "RequestError",
    "RequestOutput",
    "TokenLogprob",
]
