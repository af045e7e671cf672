"""The ClientApp Flower loads (pyproject.toml): the site's handlers, here or in its runtime.

A deployed SuperNode starts a new process for every message. With node-config
`site-runtime=PATH` the message goes to the site's resident runtime (`fedlora site`,
client/site_runtime.py), which keeps the model, the tokenised data and the data checks across
messages and runs; this process then imports neither torch nor transformers. Without it, the
handlers of client/app.py run in this process, as in a simulation.
"""

from __future__ import annotations

import socket
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.site_link import (
    RUNTIME_KEY,
    LinkError,
    check_private_socket,
    decode_exchange,
    encode_exchange,
    recv_frames,
    send_frames,
)
from common.errors import FedLoraError
from common.message_types import HEAD_ACTION
from common.packed_records import is_packed, pack, unpack

app = ClientApp()
# A runtime that accepted the message answers when the handler is done: training may take long.
CONNECT_TIMEOUT_SECONDS = 10.0


def handle(msg: Message, context: Context) -> Message:
    """The reply to `msg`, its arrays packed as the server packed the message's (one object
    each on the wire: common/packed_records.py); the handlers and mods see them unpacked."""
    packed = msg.has_content() and is_packed(msg.content)
    if packed:
        msg.content = unpack(msg.content)
    path = context.node_config.get(RUNTIME_KEY)
    if path is None:
        from client.app import app as handlers

        reply = handlers(msg, context)
    else:
        reply = forward(Path(str(path)), msg, context)
    if packed and reply.has_content():
        reply.content = pack(reply.content)
    return reply


def forward(path: Path, msg: Message, context: Context) -> Message:
    """`msg` handled by the runtime listening at `path`: its reply, and context.state as the
    handler left it. Raises FedLoraError (Flower then replies with the error) when the
    runtime cannot be reached or breaks the exchange."""
    check_private_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(CONNECT_TIMEOUT_SECONDS)
        try:
            conn.connect(str(path))
        except OSError as err:
            raise FedLoraError(f"the site runtime at {path} does not answer ({err}); is "
                               f"`fedlora site` running?") from None
        conn.settimeout(None)
        try:
            send_frames(conn, encode_exchange(msg, context))
            reply_bytes, context_bytes = recv_frames(conn, 2)
        except OSError as err:
            raise LinkError(f"the site runtime at {path} broke off: {err}") from None
    if not reply_bytes:  # the runtime could not read the request: the second frame says why
        raise FedLoraError(f"the site runtime refused the message: "
                           f"{context_bytes.decode(errors='replace')}")
    reply, returned = decode_exchange(reply_bytes, context_bytes)
    context.state = returned.state
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


# The message types client/app.py answers; each goes where handle() says.
app.train()(handle)
app.evaluate()(handle)
app.query(HEAD_ACTION)(handle)
