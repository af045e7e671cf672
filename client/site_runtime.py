"""A site's resident runtime (`fedlora site`): one long-lived process beside the SuperNode.

Flower's SuperNode starts a new ClientApp process for every message; each would import torch,
load the base model and read and tokenise the site's data again. The runtime does that once
and answers every message of every run with the same config from memory (client/app.py's
process cache: the model on the site's device, the tokenised rows, the data checks' report).
The SuperNode's ClientApp (client/entry.py) forwards each message over the runtime's socket
(client/site_link.py) and returns its reply.

The runtime owns the site's data: its --data and node settings replace the SuperNode's
node-config (which names only the socket). With --model, a run that asks for another model is
answered with an error, not trained on a model the site did not choose.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from client.site_link import (
    RUNTIME_KEY,
    STATUS_REQUEST,
    LinkError,
    decode_exchange,
    encode_exchange,
    peer_uid,
    recv_frames,
    send_frames,
)
from common.errors import FedLoraError

log = logging.getLogger("fedlora")
ACCEPT_POLL_SECONDS = 0.5  # how soon stop() is noticed


class SiteRuntime:
    """Serves the messages of one site on a Unix socket; see the module's docstring."""

    def __init__(self, socket_path: Path, data_path: Path, node_config: dict | None = None,
                 model: str | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.node_config = {**(node_config or {}), "data-path": str(data_path)}
        if RUNTIME_KEY in self.node_config:
            raise FedLoraError(f"site: node-config {RUNTIME_KEY} is the SuperNode's key, not "
                               f"the runtime's")
        self.model = model
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._answering = threading.Lock()
        self.answered = 0
        from common.config import SiteConfig
        from common.data import data_file, read_table

        SiteConfig.from_node_config(self.node_config)  # bad keys: one line, before listening
        # Unreadable data is said now, not at the first round's message.
        self.data_file = data_file(str(data_path), "site: --data")
        table = read_table(self.data_file)
        self.data_rows = len(table)
        if not self.data_rows:
            raise FedLoraError(f"site: data file {str(self.data_file)!r} has no rows")

    # -- the socket ------------------------------------------------------------------------
    def bind(self) -> None:
        """Listen at socket_path, in a folder only this user can enter; refuse a path another
        runtime answers on, replace a stale socket a killed runtime left."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise FedLoraError(f"site: {path} exists and is not a socket")
            if _answers(path):
                raise FedLoraError(f"site: another runtime is listening on {path}; stop it or "
                                   f"give another --socket")
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no moment others can open it
        try:
            listener.bind(str(path))
        except OSError as err:
            listener.close()
            raise FedLoraError(f"site: cannot listen on {path}: {err}") from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        listener.listen(8)
        listener.settimeout(ACCEPT_POLL_SECONDS)
        self._listener = listener

    def serve_forever(self) -> None:
        """Answer connections until stop(); removes the socket on the way out."""
        if self._listener is None:
            self.bind()
        import client.app  # noqa: F401  (torch and transformers: once, before the first message)

        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                # A connection a thread: a status question is answered while a message trains.
                threading.Thread(target=self._serve_and_close, args=(conn,),
                                 daemon=True).start()
        finally:
            self._listener.close()
            self.socket_path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()

    def _serve_and_close(self, conn: socket.socket) -> None:
        with conn:
            self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        if uid is not None and hasattr(os, "getuid") and uid != os.getuid():
            log.warning("fedlora site: refused a connection from user %s", uid)
            return
        conn.settimeout(60.0)  # a peer that stalls mid-frame does not hold the runtime
        try:
            if not conn.recv(1, socket.MSG_PEEK):  # a probe (is anyone listening?): no request
                return
            frames = recv_frames(conn, 2)
        except (LinkError, OSError) as err:
            log.warning("fedlora site: dropped a malformed request: %s", err)
            _refuse(conn, f"malformed request: {err}")
            return
        conn.settimeout(None)
        if frames[0] == b"":  # not a message: a question about the runtime itself
            if frames[1] == STATUS_REQUEST:
                send_frames(conn, [STATUS_REQUEST, json.dumps(self.status()).encode()])
            else:
                _refuse(conn, f"unknown request {frames[1][:40]!r}")
            return
        try:
            reply = self.answer_bytes(*frames)
        except FedLoraError as err:  # not a message: say why in the reply's place
            log.warning("fedlora site: refused a request: %s", err)
            reply = [b"", str(err).encode()]
        try:
            send_frames(conn, reply)
        except OSError as err:  # the ClientApp went away (its SuperNode was stopped)
            log.warning("fedlora site: the reply could not be sent: %s", err)

    def status(self) -> dict:
        """What `fedlora site-status` shows: who serves what, and what is held in memory."""
        from client.app import resident_sites

        return {"pid": os.getpid(), "model": self.model, "data": str(self.data_file),
                "data-rows": self.data_rows, "answered": self.answered,
                "busy": self._answering.locked(),
                "resident": resident_sites()}

    # -- the messages ------------------------------------------------------------------------
    def answer_bytes(self, message_bytes: bytes, context_bytes: bytes) -> list[bytes]:
        try:
            msg, context = decode_exchange(message_bytes, context_bytes)
        except Exception as err:  # protobuf's DecodeError, or a message Flower refuses
            raise FedLoraError(f"the request is not a Flower message and context: "
                               f"{type(err).__name__}: {err}") from None
        reply = self.answer(msg, context)
        return encode_exchange(reply, context)

    def answer(self, msg, context):
        """The reply the site's handlers give `msg`, or an error reply naming what failed."""
        with self._answering:  # one message at a time: one model, one device
            return self._answer(msg, context)

    def _answer(self, msg, context):
        from client.app import app as handlers
        from common.config import FedLoraConfig
        from common.flower_compat import exception_reply

        started = time.perf_counter()
        context.node_config = dict(self.node_config)
        try:
            cfg = FedLoraConfig.from_run_config(context.run_config)
            if self.model and cfg.model != self.model:
                raise FedLoraError(f"this site's runtime serves model {self.model!r}; the run "
                                   f"asks for {cfg.model!r} (restart `fedlora site` with "
                                   f"--model {cfg.model})")
            reply = handlers(msg, context)
        except Exception as err:  # as Flower's SuperNode reports a ClientApp's exception
            reply = exception_reply(msg, err)
        self.answered += 1
        log.info("fedlora site: %s message of run %s %s in %.1f s", msg.metadata.message_type,
                 msg.metadata.run_id, "failed" if reply.has_error() else "answered",
                 time.perf_counter() - started)
        return reply


def _refuse(conn: socket.socket, reason: str) -> None:
    """Answer a request that broke the framing with the reason, then read what the peer still
    sends (briefly): closing on unread bytes would reset the connection before it reads why."""
    try:
        conn.settimeout(1.0)
        send_frames(conn, [b"", reason.encode()])
        conn.shutdown(socket.SHUT_WR)
        for _ in range(64):
            if not conn.recv(1 << 16):
                break
    except OSError:
        pass


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
