"""An engine's steps as a member of an expert-parallel group (``Lockstep``):
collectives pair up in the order they are issued, so every member joins every
step (see expert_parallel.py), and a group that fails ends every request here.
"""

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from lightpd.common.engine.expert_parallel import ExpertParallelError, ExpertParallelGroup

if TYPE_CHECKING:
    from lightpd.common.engine.model_runner import ModelRunner
    from lightpd.common.engine.request import RequestOutput
    from lightpd.common.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


class Lockstep:
    """An engine's steps as a member of an expert-parallel group; an engine alone
    (no group) steps by itself and never fails here.

    Every member steps together: a step begins with the group's agreement, and a
    member without a batch takes part in the others' exchanges. If the group fails
    (a member died or hung), every request of the engine ends with a retry-able
    error (another node can serve it) and the engine takes no more."""

    def __init__(self, group: ExpertParallelGroup | None, runner: "ModelRunner") -> None:
        self.group = group
        self.runner = runner

    @property
    def failure(self) -> str | None:
        """Why the engine serves no more (its group failed); None while it does."""
        if self.group is None or self.group.failure is None:
            return None
        return f"the expert-parallel group failed: {self.group.failure}"

    @property
    def active(self) -> bool:
        """Whether the step under way computes on some member: this one joins it."""
        return self.group is not None and self.group.active

    def join(self, batch: "ScheduledBatch | None") -> None:
        """Agree on the step with the group; with no batch here, take part in the
        exchanges of the others' (all idle: nothing runs). ExpertParallelError if
        the group failed."""
        group = self.group
        if group is None:
            return
        num_tokens = 0
        if batch is not None:
            num_tokens = sum(e - s for s, e in zip(batch.starts, batch.ends, strict=True))
        # Decode steps of every member may replay a graph of the same size together.
        group.agree(num_tokens, decoding=batch is None or not batch.is_prefill)
        if batch is None and group.active:
            self.runner.empty_step()

    def check_batch_failure(self, exc: Exception) -> None:
        """This member's batch raised ``exc``. If it stopped short of the step's
        exchanges the others cannot go on: the group fails (ExpertParallelError).
        Otherwise the group is in step, and only the batch failed."""
        if self.group is not None and not self.group.step_done:
            self.group.fail(f"{type(exc).__name__}: {exc}")

    def end_all(
        self,
        exc: ExpertParallelError,
        request_ids: list[str],
        fail: Callable[[str, str], "RequestOutput | None"],
    ) -> list["RequestOutput"]:
        """The group failed: tear it down (never waited on), and end each of
        ``request_ids`` with ``fail`` (a retry-able error that frees its KV)."""
        self.group.abort(f"{type(exc).__name__}: {exc}")
        reason = f"{self.failure}; the request may be retried on another node"
        outputs = [o for request_id in request_ids if (o := fail(request_id, reason)) is not None]
        if outputs:
            logger.error("ended %d requests: %s", len(outputs), reason)
        return outputs
