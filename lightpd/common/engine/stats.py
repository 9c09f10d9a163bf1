"""What an engine reports of its load (a node sends it in ``NodeStats``)."""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightpd.common.engine.kv_handoff import KVHandoff
    from lightpd.common.engine.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    """An engine's load at one moment; the fields are named as ``NodeStats``' own."""

    num_free_slots: int  # free, and cached slots that no request uses (evicted on demand)
    num_reserved_slots: int  # held for KV in transit: reservations awaiting it, prompts sent
    num_running: int
    num_queued: int  # not admitted yet (queued, or their grammar compiling)
    num_queued_tokens: int  # prompt tokens not computed yet: queued and unfinished prefills
    num_preemptions: int  # requests paused for KV room since the engine started
    num_cached_slots: int  # slots the prefix cache holds
    # Prompt tokens admitted since the engine started, and how many of those came
    # from the prefix cache.
    num_prompt_tokens: int
    num_cached_prompt_tokens: int

    @classmethod
    def of(cls, scheduler: "Scheduler", kv_handoff: "KVHandoff") -> "EngineStats":
        kv = scheduler.kv
        return cls(
            num_free_slots=kv.num_available_slots,
            num_reserved_slots=kv_handoff.num_reserved_slots,
            num_running=len(scheduler.running),
            num_queued=scheduler.num_waiting,
            num_queued_tokens=scheduler.num_queued_tokens,
            num_preemptions=scheduler.num_preemptions,
            num_cached_slots=kv.num_cached_slots,
            num_prompt_tokens=kv.num_prompt_tokens,
            num_cached_prompt_tokens=kv.num_cached_prompt_tokens,
        )
