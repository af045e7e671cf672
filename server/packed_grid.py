"""The Grid a run talks to sends each message's arrays as one object (common/packed_records.py)
and unpacks the replies: in a deployment every object is an HTTPS request at the SuperLink and
at the SuperNode, and an adapter is dozens of small arrays. A reply whose packed records do not
add up becomes an error reply from its site: the round leaves it out like any failed site."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict

from common.errors import FedLoraError
from common.flower_compat import ErrorCode
from common.packed_records import is_packed, pack, unpack


class PackedGrid:
    def __init__(self, grid) -> None:
        self.grid = grid

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        originals = [m.content if m.has_content() else None for m in messages]
        # A strategy gives every site the same content: packed once, not once a site (a
        # large adapter times a thousand sites would be copied a thousand times).
        packed: dict[int, RecordDict] = {}
        for message, content in zip(messages, originals):
            if content is not None:
                if id(content) not in packed:  # `originals` keeps each id's object alive
                    packed[id(content)] = pack(content)
                message.content = packed[id(content)]
        try:
            replies = self.grid.send_and_receive(messages, timeout=timeout)
        finally:  # the sender's messages as it made them (their ids stay those pushed)
            for message, content in zip(messages, originals):
                if content is not None:
                    message.content = content
        requests = {m.metadata.message_id: m for m in messages}
        return [self._unpacked(reply, requests) for reply in replies]

    @staticmethod
    def _unpacked(reply: Message, requests: dict[str, Message]) -> Message:
        if not (reply.has_content() and is_packed(reply.content)):
            return reply
        try:
            reply.content = unpack(reply.content)
        except FedLoraError as err:
            request = requests.get(reply.metadata.reply_to_message_id)
            if request is None:  # not ours: left packed, the round's checks refuse it
                return reply
            return Message(Error(code=ErrorCode.UNKNOWN, reason=f"bad reply: {err}"),
                           reply_to=request)
        return reply

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
