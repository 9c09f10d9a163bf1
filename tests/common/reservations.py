"""Reservation states a test reaches directly, as a decode node's engine does
between steps: through the scheduler and the KV hand-off, not a connector."""

import torch

from lightpd.common.engine import LLMEngine


def admit_reservations(engine: LLMEngine) -> None:
    """Admit the queued reservations that fit now, without running a step; the next
    ``pop_admitted`` reports them (and starts their receives)."""
    engine.scheduler.admit_waiting_reservations()


def reserved_slots(engine: LLMEngine, request_id: str) -> torch.Tensor:
    """The slots an admitted reservation's KV must fill: its prompt positions past
    its cached prefix, int32. RequestError if ``request_id`` holds no reservation."""
    handoff = engine.kv_handoff
    return handoff.uncached_prompt_slots(handoff.reservation(request_id))
