"""A Flower Grid for a federation inside this process: every message goes to a ClientApp with
its node's Context (partition-id, persistent state) as a simulation's SuperNodes would hand it
over, serialised both ways like a transport, without Ray's start-up. For tests, benchmarks and
stepping through a round in a debugger."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from common.config import FedLoraConfig
from common.flower_compat import (
    exception_reply,
    message_from_proto,
    message_to_proto,
    stamp_message_id,
)


class InProcessGrid:
    def __init__(self, cfg: FedLoraConfig, num_nodes: int, app: ClientApp | None = None,
                 first_node_id: int = 1000) -> None:
        if app is None:
            from client.app import app
        self.app = app
        run_config = cfg.to_run_config()
        self.contexts = {
            first_node_id + i: Context(run_id=1, node_id=first_node_id + i, state=RecordDict(),
                                       node_config={"partition-id": i,
                                                    "num-partitions": num_nodes},
                                       run_config=run_config)
            for i in range(num_nodes)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        messages = list(messages)
        for msg in messages:  # as a grid's push does: replies then name their request
            stamp_message_id(msg)
        return [over_the_wire(self._handle(over_the_wire(msg))) for msg in messages]

    def _handle(self, msg: Message) -> Message:
        try:
            return self.app(message=msg, context=self.contexts[msg.metadata.dst_node_id])
        except Exception as ex:  # as the SuperNode's runtime answers for a ClientApp that raised
            return exception_reply(msg, ex)


def over_the_wire(message: Message) -> Message:
    """A serialised copy, as a transport delivers it: records a receiver changes (SecAgg+'s mod
    pops keys) must not change what the sender or the next receiver holds."""
    return message_from_proto(message_to_proto(message))
