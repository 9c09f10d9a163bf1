"""The prefill node: computes prompts' KV and hands it, layer by layer, to decode nodes.

Its engine runs prompts only: each request's KV goes to the decode node that
reserved slots for it, through the connector, as each layer is written; then
the first token. The KV stays in the pool until the decode node acknowledges
it or the deadline passes; the control plane hears when the prompt is done
(a token-less event) and of any failure.
"""

from lightpd.common.engine import FinishReason, RequestError, RequestOutput
from lightpd.common.engine.connector import KVSendSpec
from lightpd.common.node.runtime import error_event
from lightpd.common.node.server import Client, NodeServer
from lightpd.common.wire.messages import Accepted, Message, Prefill, TokenEvent


class PrefillServer(NodeServer):
    role = "prefill"

    def handle(self, identity: bytes, message: Message) -> bool:
        if not isinstance(message, Prefill):
            return False
        mismatch = self.layout.describe_mismatch(message.target.layout)
        if mismatch:
            reason = f"KV layout mismatch with the decode target ({mismatch})"
            self.refuse(identity, message, reason, "invalid")
            return True
        if message.params.seed is None:
            reason = "params.seed must be set, so decode continues the same random stream"
            self.refuse(identity, message, reason, "invalid")
            return True
        target = KVSendSpec(
            message.target.endpoint,
            message.secret,
            message.ack_timeout_s,
            message.target.transport,
            message.target.skip_tokens,
        )
        try:
            self.engine.add_request(
                message.request_id, message.prompt_token_ids, message.params, target
            )
        except RequestError as exc:
            self.refuse(identity, message, str(exc), "invalid")
            return True
        self.clients[message.request_id] = Client(identity, message.secret)
        accepted = Accepted(call_id=message.call_id, request_id=message.request_id)
        self.send_to_origin(identity, accepted)
        return True

    def event_for(self, output: RequestOutput) -> TokenEvent | None:
        if output.finish_reason is FinishReason.ERROR:
            return error_event(output.request_id, output.error or "failed", output.retry)
        if output.finish_reason is None and output.new_token_ids:
            # The prompt is computed and its last KV and first token are in flight
            # (the request's "transferring" state); the token itself goes to decode.
            return TokenEvent(
                request_id=output.request_id,
                num_prompt_tokens=output.num_prompt_tokens,
                num_cached_tokens=output.num_cached_tokens,
            )
        return None  # handed off or aborted: nothing the control plane waits for
