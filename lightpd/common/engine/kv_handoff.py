"""The engine's side of the prefill/decode KV hand-off, through a KV connector.

Sending (a prefill engine): a request with a KV target sends its prompt's KV layer
by layer while the prompt runs (``saver``). Its first token leaves with the last
of it (``hand_off``): the request leaves the batch, its KV is held until the
receiver confirms, then freed (``take_transfers``).

Receiving (a decode engine): a reservation starts receiving once its admission
is taken (``start_receives``), into the slots past its cached prefix; the
sender's KVDone brings its first token and it decodes from there
(``complete_reservation``).

A transfer that fails ends its request with a retry-able error: the fault is the
hand-off's, and another node may serve the request. Any request that leaves the
engine leaves its transfer too (``drop``).
"""

import logging
from collections.abc import Callable

import torch

from lightpd.common.engine.connector import KVConnector, KVDone, KVSendSpec, LayerChunk
from lightpd.common.engine.request import (
    FinishReason,
    Request,
    RequestError,
    RequestOutput,
    RequestStatus,
    TokenLogprob,
)
from lightpd.common.engine.scheduler import ScheduledBatch, Scheduler

logger = logging.getLogger(__name__)


class KVHandoff:
    def __init__(
        self,
        scheduler: Scheduler,
        requests: dict[str, Request],
        vocab_size: int,
        connector: KVConnector | None = None,
    ) -> None:
        """``requests``: the engine's, by id, wherever they are (a request that leaves
        is forgotten there)."""
        self.scheduler = scheduler
        self.requests = requests
        self.vocab_size = vocab_size
        self.connector = connector
        self._sending: dict[str, Request] = {}  # prompt done, KV held until the send ends

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()

    @property
    def num_reserved_slots(self) -> int:
        """Slots held for KV in transit: reservations awaiting it, prompts being sent."""
        running = self.scheduler.running
        awaiting = sum(r.num_slots - r.num_cached_slots for r in running if r.awaits_kv)
        return awaiting + sum(r.num_slots for r in self._sending.values())

    # ---- leaving ----

    def drop(self, request_id: str) -> Request | None:
        """Take ``request_id`` out wherever it is (queued, running, its KV being sent):
        its transfer stopped, its KV freed, forgotten. None if it is not here. (Here,
        since only the hand-off holds requests outside the scheduler.)"""
        if self.connector is not None:
            self.connector.cancel(request_id)
        request = self._sending.pop(request_id, None)
        if request is not None:
            self.scheduler.kv.deallocate(request)
        else:
            request = self.scheduler.abort(request_id)
        if request is not None:
            del self.requests[request_id]
        return request

    # ---- sending ----

    def start_send(self, request: Request, target: KVSendSpec) -> None:
        """Send ``request``'s prompt KV to ``target`` as it is computed; RequestError
        (and nothing started) if it cannot go there."""
        if request.output_token_ids:
            raise RequestError("a resumed request is decoded where it is computed")
        if self.connector is None:
            raise RequestError("this engine has no KV connector to send with")
        if not 0 <= target.skip_tokens < request.num_prompt_tokens:
            raise RequestError(
                f"the receiver cannot hold {target.skip_tokens} of the prompt's "
                f"{request.num_prompt_tokens} tokens: at least the last one is sent"
            )
        try:
            self.connector.start_send(request.request_id, target)
        except ValueError as exc:
            raise RequestError(str(exc)) from exc
        request.kv_send = target
        request.num_kv_sent = target.skip_tokens

    def saver(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """What the runner calls after each layer's K/V of ``batch`` are written."""
        if self.connector is None or not batch.is_prefill:
            return None
        table = self.scheduler.table.req_to_token
        chunks = []
        for request, end in zip(batch.requests, batch.ends, strict=True):
            if request.kv_send is None or end <= request.num_kv_sent:
                continue
            # From where the last chunk ended (at first, where the receiver's cached
            # prefix ends): a cached part of the prompt goes with the first chunk
            # computed, its KV read from the cache's slots. Positions count from
            # the first one sent.
            start, skip = request.num_kv_sent, request.kv_send.skip_tokens
            slots = table[request.row, start:end]
            chunks.append(LayerChunk(request.request_id, start - skip, slots))
            request.num_kv_sent = end
        if not chunks:
            return None
        connector = self.connector
        return lambda layer: connector.save_layer(layer, chunks)

    def hand_off(self, outputs: list[RequestOutput]) -> None:
        """Send the first token of each prompt sent in ``outputs``; hold its KV until
        the send ends."""
        for output in outputs:
            request = self.requests.get(output.request_id)
            sent = request is not None and request.kv_send is not None
            if not sent or output.finished or not output.new_token_ids:
                continue
            self.scheduler.detach(request)
            self._sending[request.request_id] = request
            self.connector.finish_send(
                request.request_id,
                request.num_prompt_tokens - request.kv_send.skip_tokens,
                output.new_token_ids[0],
                output.new_logprobs,
                request.num_cached_tokens or 0,
            )

    # ---- receiving ----

    def start_receives(self, admitted: list[Request]) -> None:
        """Receive the KV of the reservations among newly ``admitted`` requests that
        still run (one that prefills here may even have finished)."""
        if self.connector is None:
            return
        for request in admitted:
            receives = request.awaits_kv and request.kv_recv is not None
            if receives and request.status is RequestStatus.RUNNING:
                # The cached prefix is here already: only the rest comes.
                slots = self.uncached_prompt_slots(request)
                self.connector.start_recv(request.request_id, slots, slots.numel(), request.kv_recv)

    def uncached_prompt_slots(self, request: Request) -> torch.Tensor:
        """Slots of ``request``'s prompt positions past its cached prefix, int32: where
        a reservation's KV goes."""
        start = request.num_cached_slots
        return self.scheduler.table.req_to_token[request.row, start : request.num_prompt_tokens]

    def reservation(self, request_id: str) -> Request:
        """The admitted reservation ``request_id``; RequestError if there is none
        (unknown, finished, not yet admitted or already completed)."""
        request = self.requests.get(request_id)
        if request is None or not request.awaits_kv or request.row < 0:
            raise RequestError(f"request {request_id!r} holds no reservation awaiting KV")
        return request

    def complete_reservation(
        self, request_id: str, first_token: int, logprobs: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        """The KV of reservation ``request_id`` is in its slots and ``first_token`` was
        sampled after it: it joins the decode batch. RequestError (and nothing
        changed) if it is no admitted reservation or the token is out of range."""
        request = self.reservation(request_id)
        if not 0 <= first_token < self.vocab_size:
            raise RequestError(f"first token {first_token} is outside the vocabulary")
        output = self.scheduler.complete_reservation(request, first_token, logprobs)
        if output.finished:
            del self.requests[request_id]
        return output

    # ---- what the connector finished ----

    def take_transfers(self) -> list[RequestOutput]:
        """What the connector finished since the last call: sends (the request
        handed off, or a retry-able error; its KV freed either way) and receives
        (the reservation's first token, or a retry-able error)."""
        if self.connector is None:
            return []
        outputs = []
        for event in self.connector.poll():
            if event.request_id in self._sending:
                reason = None if isinstance(event, KVDone) else event.reason
                outputs.append(self._send_ended(event.request_id, reason))
            elif isinstance(event, KVDone) and event.first_token is not None:
                outputs += self._received(event)
            elif not isinstance(event, KVDone):
                outputs += self._failed(event.request_id, event.reason)
        return outputs

    def _send_ended(self, request_id: str, failure: str | None) -> RequestOutput:
        # Confirmed or failed, the KV is of no more use here.
        request = self._sending.pop(request_id)
        self.scheduler.kv.deallocate(request)
        del self.requests[request_id]
        if failure is None:
            return RequestOutput.ending(request, FinishReason.HANDED_OFF)
        return RequestOutput.ending(request, FinishReason.ERROR, failure, retry=True)

    def _received(self, event: KVDone) -> list[RequestOutput]:
        try:
            output = self.complete_reservation(event.request_id, event.first_token, event.logprobs)
        except RequestError as exc:
            return self._failed(event.request_id, str(exc))
        # The prompt was computed by the sender: its cache is what saved work.
        output.num_cached_tokens = event.num_cached_tokens
        return [output]

    def _failed(self, request_id: str, reason: str) -> list[RequestOutput]:
        request = self.drop(request_id)
        if request is None:
            return []
        logger.warning("request %s: %s", request_id, reason)
        return [RequestOutput.ending(request, FinishReason.ERROR, reason, retry=True)]
