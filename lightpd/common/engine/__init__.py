from lightpd.common.engine.config import EngineConfig
from lightpd.common.engine.llm_engine import LLMEngine
from lightpd.common.engine.request import FinishReason, RequestError, RequestOutput, TokenLogprob
from lightpd.common.engine.stats import EngineStats

__all__ = [
    "EngineConfig",
    "EngineStats",
    "FinishReason",
    "LLMEngine",
    "RequestError",
    "RequestOutput",
    "TokenLogprob",
]
