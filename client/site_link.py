"""The local channel between a site's per-message ClientApp and its resident runtime
(client/site_runtime.py): a Unix socket that only the site's own user can open.

One exchange a connection. The ClientApp sends two frames, the message and its context (Flower's
own protobuf encoding: no pickle crosses the socket, so a peer can send data, never code); the
runtime answers with two frames, the reply and the context as the handler left it (SecAgg+
keeps its stage state there). A frame is MAGIC, an 8-byte big-endian length and the bytes.

Who may connect: the socket's folder is made 0700 and the socket 0600; the runtime refuses a
peer whose user differs (SO_PEERCRED, Linux), and the ClientApp refuses a socket that is not
its user's or that others could open. Imports no torch: the ClientApp stays light.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import tempfile
from pathlib import Path

from common.errors import FedLoraError

MAGIC = b"FLSR1"  # fedlora site runtime, version 1 of the framing
_LENGTH = struct.Struct(">Q")
MAX_FRAME_BYTES = 4 << 30  # an adapter of a large model fits; a corrupt length does not
RUNTIME_KEY = "site-runtime"  # the SuperNode's node-config key naming the runtime's socket
# A request whose first frame is empty asks the runtime about itself; the second names what.
STATUS_REQUEST = b"status"


def default_socket() -> Path:
    """Where `fedlora site` listens unless told: a folder of this user's."""
    user = os.getuid() if hasattr(os, "getuid") else "all"
    return Path(tempfile.gettempdir()) / f"fedlora-site-{user}" / "site.sock"


class LinkError(FedLoraError):
    """The other side broke the framing or went away."""


def send_frames(conn: socket.socket, frames: list[bytes]) -> None:
    conn.sendall(b"".join(MAGIC + _LENGTH.pack(len(frame)) + frame for frame in frames))


def recv_frames(conn: socket.socket, count: int) -> list[bytes]:
    frames = []
    for _ in range(count):
        head = _recv_exactly(conn, len(MAGIC) + _LENGTH.size)
        if head[:len(MAGIC)] != MAGIC:
            raise LinkError("not a fedlora site-runtime frame")
        (size,) = _LENGTH.unpack(head[len(MAGIC):])
        if size > MAX_FRAME_BYTES:
            raise LinkError(f"a frame of {size} bytes is over the limit ({MAX_FRAME_BYTES})")
        frames.append(_recv_exactly(conn, size))
    return frames


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise LinkError("the other side closed the connection mid-exchange")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user (Linux); None where the kernel does not say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def check_private_socket(path: Path) -> None:
    """Raise unless `path` is a socket of this user that no other user can open."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FedLoraError(f"no site runtime at {path}: start it with `fedlora site`") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise FedLoraError(f"{path} is not a socket")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise FedLoraError(f"the site runtime's socket {path} belongs to another user")
    if info.st_mode & 0o077:
        raise FedLoraError(f"the site runtime's socket {path} has mode "
                           f"{stat.S_IMODE(info.st_mode):04o}; others could open it (0600 "
                           f"expected)")


def request_status(path: Path, timeout: float = 10.0) -> dict:
    """The runtime's own account of itself (SiteRuntime.status), or FedLoraError saying why
    there is none."""
    import json

    check_private_socket(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            send_frames(conn, [b"", STATUS_REQUEST])
            kind, body = recv_frames(conn, 2)
        except OSError as err:
            raise FedLoraError(f"the site runtime at {path} does not answer ({err})") from None
    if kind != STATUS_REQUEST:
        raise FedLoraError(f"the site runtime at {path} refused: {body.decode(errors='replace')}")
    return json.loads(body)


def encode_exchange(msg, context) -> list[bytes]:
    """A message and its context as the two frames that cross the socket (either way)."""
    from common.flower_compat import context_to_proto, message_to_proto

    return [message_to_proto(msg).SerializeToString(),
            context_to_proto(context).SerializeToString()]


def decode_exchange(message_bytes: bytes, context_bytes: bytes):
    """The message and context of encode_exchange's frames; raises what protobuf or Flower
    raise for bytes that are not one."""
    from common.flower_compat import (
        ProtoContext,
        ProtoMessage,
        context_from_proto,
        message_from_proto,
    )

    return (message_from_proto(ProtoMessage.FromString(message_bytes)),
            context_from_proto(ProtoContext.FromString(context_bytes)))
