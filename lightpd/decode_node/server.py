"""The decode node: reserves slots, receives prompt KV into them, decodes in a batch.

A Reserve waits in the engine's queue, in order, for up to its queue timeout
(then it is answered "busy"); once admitted it is answered Reserved with where
to send the KV, and the connector fills its slots under its secret within its
KV timeout. The first token completes it and it decodes with the others.

A Reserve with ``prefill_here`` (no prefill node, or a short prompt) is a plain
request instead: it waits in the same queue under the same timeout and is
answered Reserved on admission the same way, but this node computes its prompt
and samples its first token; no KV comes.
"""

from lightpd.common.engine import RequestError, RequestOutput
from lightpd.common.engine.connector import KVRecvSpec
from lightpd.common.node.runtime import token_event
from lightpd.common.node.server import Client, NodeServer
from lightpd.common.wire.messages import Error, Message, Reserve, Reserved, TokenEvent


class DecodeServer(NodeServer):
    role = "decode"
    receives_kv = True

    def __init__(self, config) -> None:
        super().__init__(config)
        self.pending: dict[str, int] = {}  # request id -> call id of its Reserve

    def handle(self, identity: bytes, message: Message) -> bool:
        if not isinstance(message, Reserve):
            return False
        if self.engine.failure is not None:  # it is leaving: another node can serve it
            self.refuse(identity, message, self.engine.failure, "busy")
            return True
        if len(self.pending) >= self.config.max_queued:
            reason = f"the queue is full ({self.config.max_queued} waiting)"
            self.refuse(identity, message, reason, "busy")
            return True
        try:
            if message.prefill_here:
                self.engine.add_request(
                    message.request_id,
                    message.prompt_token_ids,
                    message.params,
                    queue_timeout_s=message.queue_timeout_s,
                    output_token_ids=message.output_token_ids,
                )
            elif message.output_token_ids:
                raise RequestError("a resumed request must be prefilled here")
            else:
                self.engine.reserve(
                    message.request_id,
                    message.prompt_token_ids,
                    message.params,
                    KVRecvSpec(message.secret, message.kv_timeout_s),
                    message.queue_timeout_s,
                )
        except RequestError as exc:
            self.refuse(identity, message, str(exc), "invalid")
            return True
        self.clients[message.request_id] = Client(identity, message.secret)
        self.pending[message.request_id] = message.call_id
        return True

    def after_step(self) -> None:
        self._answer_admitted()
        for request_id in self.engine.expire_waiting():
            call_id = self.pending.pop(request_id)
            client = self.clients.pop(request_id)
            reason = "no KV slots freed up within the request's queue timeout"
            error = Error(call_id=call_id, request_id=request_id, code="busy", message=reason)
            self.send_to_origin(client.origin, error)

    def _answer_admitted(self) -> None:
        for request_id in self.engine.pop_admitted():
            call_id = self.pending.pop(request_id, None)
            client = self.clients.get(request_id)
            if call_id is None or client is None:
                continue
            reserved = Reserved(
                call_id=call_id,
                request_id=request_id,
                kv_endpoint=self.kv_endpoint,
                layout=self.layout,
                kv_transport=self.connector.transport,
                num_cached_tokens=self.engine.cached_prefix(request_id),
            )
            self.send_to_origin(client.origin, reserved)

    def publish(self, outputs: list[RequestOutput]) -> None:
        # A request prefilled here has its first token (or even its end) in the step
        # that admitted it: its Reserved goes out first, and before its tokens.
        self._answer_admitted()
        for output in outputs:
            self.pending.pop(output.request_id, None)
        super().publish(outputs)

    def event_for(self, output: RequestOutput) -> TokenEvent | None:
        return token_event(output)
