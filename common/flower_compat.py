"""Every use of Flower's non-public modules, in one place, for the Flower versions fedlora
supports.

fedlora uses Flower's public API (`flwr.app`, `flwr.clientapp`, `flwr.serverapp`, and the
legacy `flwr.common`, `flwr.server` and `flwr.client` packages for SecAgg+, which exists only
there) everywhere else. What Flower does not make public, but fedlora needs, is reached here:
message serialisation (byte counts, the in-process grid, a site runtime's socket), the
SuperLink's run and task identity (the simulation runner, which starts a run as `flwr run`
would), the simulation engine's actor pool (the start-up speed-ups), the RDP accountant and
Gaussian noise (client-level DP), the legacy SecAgg+ workflow's record layout, and `flwr` CLI's
connection file. A Flower release that moves any of them needs a change here only
(docs/architecture.md: what 1.43 changes).

Names are resolved when first used, not at import: several pull in Ray, SQLAlchemy or the
simulation engine, which a client process must not pay for (simulations/actors.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

SUPPORTED_FLOWER = ((1, 41), (1, 42))


def _installed_flower() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "none"


def check_flower_version(installed: str | None = None) -> None:
    """Exit with one line when the installed Flower is not one fedlora supports."""
    installed = installed or _installed_flower()
    parts = installed.split(".")
    release = tuple(int(p) for p in parts[:2]) if all(p.isdigit() for p in parts[:2]) else ()
    if release not in SUPPORTED_FLOWER:
        supported = " and ".join(f"{a}.{b}" for a, b in SUPPORTED_FLOWER)
        raise SystemExit(f"fedlora: error: flwr {installed} is installed; fedlora supports flwr "
                         f"{supported} (pip install 'flwr[simulation,dp]>=1.41,<1.43')")


check_flower_version()

# name -> (module, attribute): resolved on first use (PEP 562).
_NAMES: dict[str, tuple[str, str]] = {
    # message serialisation: byte counts and the in-process grid's wire copy
    "recorddict_to_proto": ("flwr.common.serde", "recorddict_to_proto"),
    "message_to_proto": ("flwr.common.serde", "message_to_proto"),
    "message_from_proto": ("flwr.common.serde", "message_from_proto"),
    # a site's resident runtime: a message and its context across a local socket
    "context_to_proto": ("flwr.common.serde", "context_to_proto"),
    "context_from_proto": ("flwr.common.serde", "context_from_proto"),
    "ProtoMessage": ("flwr.proto.message_pb2", "Message"),
    "ProtoContext": ("flwr.proto.message_pb2", "Context"),
    "ErrorCode": ("flwr.common.constant", "ErrorCode"),
    # logging
    "update_console_handler": ("flwr.common.logger", "update_console_handler"),
    # the simulation engine: a run started as `flwr run` would, its actors
    "run_simulation_in_process": ("flwr.simulation.run_simulation", "_run_simulation"),
    "Run": ("flwr.supercore.run", "Run"),
    "EventType": ("flwr.supercore.telemetry", "EventType"),
    "NOOP_FEDERATION_ID": ("flwr.supercore.constant", "NOOP_FEDERATION_ID"),
    "RUN_ID_NUM_BYTES": ("flwr.common.constant", "RUN_ID_NUM_BYTES"),
    "TASK_ID_NUM_BYTES": ("flwr.common.constant", "TASK_ID_NUM_BYTES"),
    "SUPERLINK_NODE_ID": ("flwr.common.constant", "SUPERLINK_NODE_ID"),
    "generate_rand_int_from_bytes": ("flwr.server.superlink.linkstate.utils",
                                     "generate_rand_int_from_bytes"),
    "ClientAppException": ("flwr.clientapp.client_app", "ClientAppException"),
    "LoadClientAppError": ("flwr.clientapp.client_app", "LoadClientAppError"),
    "ClientAppCallable": ("flwr.clientapp.typing", "ClientAppCallable"),
    "BasicActorPool": ("flwr.simulation.ray_transport.ray_actor", "BasicActorPool"),
    "ClientAppActor": ("flwr.simulation.ray_transport.ray_actor", "ClientAppActor"),
    "parse_config_args": ("flwr.common.config", "parse_config_args"),
    "flower_trim_mean": ("flwr.serverapp.strategy.fedtrimmedavg", "trim_mean"),
    # client-level DP: Flower's noise and RDP accounting
    "add_gaussian_noise_inplace": ("flwr.supercore.differential_privacy",
                                   "add_gaussian_noise_inplace"),
    "compute_stdv": ("flwr.supercore.differential_privacy", "compute_stdv"),
    "KEY_CLIPPING_NORM": ("flwr.supercore.differential_privacy", "KEY_CLIPPING_NORM"),
    "RdpAccountant": ("flwr.supercore.privacy_accounting.rdp_accountant", "RdpAccountant"),
    "GaussianPrivacyEvent": ("flwr.supercore.privacy_accounting", "GaussianPrivacyEvent"),
    "NeighboringRelation": ("flwr.supercore.privacy_accounting", "NeighboringRelation"),
    "PrivacyConfig": ("flwr.supercore.privacy_accounting", "PrivacyConfig"),
    "SamplingMethod": ("flwr.supercore.privacy_accounting", "SamplingMethod"),
    # SecAgg+ through the legacy workflow: its record keys and client proxies
    "GridClientProxy": ("flwr.server.compat.grid_client_proxy", "GridClientProxy"),
    "LegacyContext": ("flwr.server.compat.legacy_context", "LegacyContext"),
    "ClientProxy": ("flwr.server.client_proxy", "ClientProxy"),
    "MAIN_CONFIGS_RECORD": ("flwr.server.workflow.constant", "MAIN_CONFIGS_RECORD"),
    "MAIN_PARAMS_RECORD": ("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD"),
    "SecAggKey": ("flwr.server.workflow.constant", "Key"),
    "SECAGG_RECORD_KEY_CONFIGS": ("flwr.common.secure_aggregation.secaggplus_constants",
                                  "RECORD_KEY_CONFIGS"),
    "arrayrecord_to_parameters": ("flwr.compat.common.recorddict_compat",
                                  "arrayrecord_to_parameters"),
    "fitres_to_recorddict": ("flwr.compat.common.recorddict_compat", "fitres_to_recorddict"),
    # the flwr CLI's connection file ($FLWR_HOME/config.toml)
    "write_superlink_connection": ("flwr.cli.flower_config", "write_superlink_connection"),
    "set_default_superlink_connection": ("flwr.cli.flower_config",
                                         "set_default_superlink_connection"),
    "SuperLinkConnection": ("flwr.cli.typing", "SuperLinkConnection"),
}


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _NAMES[name]
    value = getattr(importlib.import_module(module), attribute)
    setattr(sys.modules[__name__], name, value)
    return value


def set_task_identity(run_id: int, task_id: int, node_id: int) -> None:
    """What Flower's runtime sets before a ServerApp builds messages (their run, task and
    source node); the simulation runner and an in-process ServerApp set it the same way."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, task_id, node_id


def exception_reply(msg: Any, err: BaseException) -> Any:
    """The reply Flower's runtime sends for a ClientApp that raised `err` on `msg` (its error
    code and its wording of the reason), for the places that run a ClientApp themselves."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode as FlowerErrorCode

    return Message(Error(code=FlowerErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                         reason=str(type(err)) + ":<'" + str(err) + "'>"), reply_to=msg)


def stamp_message_id(msg: Any) -> str:
    """Give a message its id as Flower's grids do when they push it (its content's object id):
    replies then name it in reply_to_message_id. For the in-process grid."""
    if not msg.metadata.message_id:
        msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg.metadata.message_id


@contextlib.contextmanager
def actor_pool_adds_with(add_actors: Callable[[Any, int], None]) -> Iterator[None]:
    """While open, the simulation engine's actor pool grows by `add_actors(pool, count)`
    instead of its own method (Flower 1.41/1.42 have no option to hand it actors)."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    flowers = BasicActorPool.add_actors_to_pool
    BasicActorPool.add_actors_to_pool = add_actors
    try:
        yield
    finally:
        BasicActorPool.add_actors_to_pool = flowers


LOCAL_WAIT_SECONDS = 0.05  # a SuperNode's wait on its own state: no request leaves the machine
# The first wait before asking the SuperLink again for an object it does not hold yet (Flower:
# PULL_INITIAL_BACKOFF, 1 s; each wait after it doubles, as Flower's do).
OBJECT_RETRY_SECONDS = 0.05


def sooner_object_retries(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `pull_objects` with its first retry after OBJECT_RETRY_SECONDS. A message is
    visible to its receiver as soon as its sender has pushed it, before the sender has pushed
    its objects (one request each, after the message's): a receiver that asks in that gap finds
    an object missing and, in Flower 1.41/1.42, asks again only after 1 s (measured: a reply
    the ServerApp asked for ~1 s early once a round or so, a SuperNode's message now and then;
    bench/deployment.py)."""
    if getattr(pull_objects, "fedlora_sooner", False):
        return pull_objects
    sooner = functools.partial(pull_objects, initial_backoff=OBJECT_RETRY_SECONDS)
    sooner.fedlora_sooner = True  # type: ignore[attr-defined]
    return sooner


def retry_reply_objects_sooner() -> None:
    """The ServerApp's deployment grid (`flwr.superlink.grid.http_grid`) with
    `sooner_object_retries` when it pulls the sites' replies. A Flower whose grid no longer
    pulls objects this way keeps its own pace (a speed-up only; nothing depends on it)."""
    from flwr.superlink.grid import http_grid

    if callable(getattr(http_grid, "pull_objects", None)):
        http_grid.pull_objects = sooner_object_retries(http_grid.pull_objects)


def run_supernode(argv: list[str], poll_seconds: float, clientapp: Any = None,
                  app_name: str = "fedlora") -> None:
    """Flower's `flower-supernode` with `argv`, its loop paced: when a look at the SuperLink
    found no message it looks again after `poll_seconds`, not 3 s, and its waits on its own
    state (a ClientApp's reply, an object's bytes: 0.5 s each) last at most 0.05 s. All are
    literal `time.sleep` calls in 1.41/1.42's `flwr.supernode.start_client_internal`, with no
    setting. Its SuperExec (FLWR_SUPEREXEC_TASK_POLL_INTERVAL, unless set) looks for
    ClientApps to start every 0.1 s at most instead of 1 s: that look stays on the machine.
    With `clientapp`, the SuperNode starts no SuperExec (`--isolation process`): a thread of
    this process is its executor and runs every message with `clientapp`
    (`serve_clientapp_tasks`), so no message waits for a process to start. A message's objects
    not at the SuperLink yet are asked for again sooner (`sooner_object_retries`)."""
    import os
    import time

    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    from common.errors import FedLoraError

    if not isinstance(getattr(loop, "time", None), types.ModuleType):
        raise FedLoraError("this Flower's SuperNode loop has no `time` to pace; "
                           "run flower-supernode itself")
    if clientapp is not None:
        from flwr.supercore.constant import SUPERNODE_UVICORN_DEFAULT_PORT, UVICORN_DEFAULT_HOST

        if any(arg.split("=")[0] in ("--isolation", "--ssl-certfile", "--appio-ssl-certfile",
                                     "--clientappio-api-address") for arg in argv):
            raise FedLoraError("supernode: --in-process runs the ClientApp itself; leave out "
                               "--isolation, --clientappio-api-address and the runtime API's "
                               "--ssl-* options")
        address = (f"{_flag(argv, '--host', UVICORN_DEFAULT_HOST)}:"
                   f"{_flag(argv, '--port', str(SUPERNODE_UVICORN_DEFAULT_PORT))}")
        argv = [*argv, "--isolation", "process"]
        stored = _signal_stored_messages(loop)
        threading.Thread(target=serve_clientapp_tasks, name="fedlora-clientapp-executor",
                         args=(address, clientapp, app_name), kwargs={"stored": stored},
                         daemon=True).start()
    real_sleep = time.sleep
    paced = types.ModuleType("time")
    paced.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    paced.sleep = lambda seconds: real_sleep(
        min(seconds, poll_seconds if seconds >= 1 else min(poll_seconds, LOCAL_WAIT_SECONDS)))
    loop.time = paced
    if callable(getattr(loop, "pull_objects", None)):
        loop.pull_objects = sooner_object_retries(loop.pull_objects)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                          str(min(max(poll_seconds, 0.01), 0.1)))
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


def _signal_stored_messages(loop: types.ModuleType) -> threading.Event | None:
    """An event set each time the SuperNode's loop (same process) has stored a message from the
    SuperLink, its ClientApp task made; None where this Flower's loop has no such step."""
    store = getattr(loop, "_pull_and_store_message", None)
    if not callable(store):
        return None
    stored = threading.Event()

    def pull_and_store_message(*args: Any, **kwargs: Any) -> Any:
        run_id = store(*args, **kwargs)
        if run_id is not None:
            stored.set()
        return run_id

    loop._pull_and_store_message = pull_and_store_message
    return stored


def _flag(argv: list[str], name: str, default: str) -> str:
    """The value of `name` in a command line (`--port 9094` or `--port=9094`), else default."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


EXECUTOR_IDLE_SECONDS = 1.0  # an executor told of stored messages asks anyway this often


def serve_clientapp_tasks(runtime_api_address: str, clientapp: Any, app_name: str,
                          poll_seconds: float = LOCAL_WAIT_SECONDS,
                          stored: threading.Event | None = None) -> None:
    """Be the SuperExec of a SuperNode started with `--isolation process`: take each ClientApp
    task it has and run it here with `clientapp`, not in a new `flwr-clientapp` process, for
    as long as the process lives (a daemon thread of the SuperNode's). As Flower's
    `run_clientapp` does for one task: pull the message and context, send heartbeats
    meanwhile, push the reply and the task's outcome. A run of another app than `app_name`
    gets an error reply (this process holds fedlora's code only, not the run's FAB). Flower's
    own heartbeat function interrupts its process when the task is gone; a SuperNode must
    outlive a run, so here a failed beat is only retried. With `stored` (set by the SuperNode's
    loop when it has stored a message) it asks for a task when told, and every
    EXECUTOR_IDLE_SECONDS; without, every `poll_seconds` (each ask is a request to the
    SuperNode's API: 20 a second at 0.05 s, the CPU of which the sites' training shares)."""
    import time

    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode as FlowerErrorCode
    from flwr.common.constant import SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    def runtime_client(component: str, token: str | None = None) -> Any:
        interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def run_task(token: str) -> None:
        client = runtime_client("flwr-clientapp", token)
        beat = SendTaskHeartbeatRequest()

        def heartbeat() -> bool:
            try:
                client.SendTaskHeartbeat(beat)
            except Exception:  # noqa: BLE001 - a missed beat is retried by the sender
                return False
            return True

        heart = HeartbeatSender(heartbeat)
        heart.start()
        context, status, details = None, SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run = _pull_task_input(client)
            if run.fab_id.split("/")[-1] != app_name:
                details = (f"this SuperNode runs {app_name}'s ClientApp in its own process; "
                           f"run {run.fab_id} under flower-supernode")
                reply = Message(Error(code=FlowerErrorCode.LOAD_CLIENT_APP_EXCEPTION,
                                      reason=details), reply_to=message)
            else:
                try:
                    reply = clientapp(message=message, context=context)
                    status, details = SubStatus.COMPLETED, ""
                except Exception as ex:  # noqa: BLE001 - as run_clientapp: the error is the reply
                    reply = exception_reply(message, ex)
                    details = reply.error.reason
            push_message(client, reply, context)
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status,
                                 details=details)
            finally:
                heart.stop()
                client.close()

    executor = runtime_client("SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log = logging.getLogger("fedlora")
    while True:
        if stored is not None:
            stored.clear()  # a message stored from here on wakes the wait below
        try:
            acquired = executor.AcquireTask(request)
        except Exception:  # noqa: BLE001 - the SuperNode's API is not up yet, or restarting
            time.sleep(0.5)
            continue
        if acquired.HasField("task") and acquired.token:
            try:
                run_task(acquired.token)
            except Exception as err:  # noqa: BLE001 - one task's failure ends that task only
                log.error("fedlora supernode: a ClientApp task failed: %s", err)
            continue
        if stored is not None:
            stored.wait(EXECUTOR_IDLE_SECONDS)
        else:
            time.sleep(poll_seconds)


def _pull_task_input(client: Any) -> tuple[Any, Any, Any]:
    """The task's message, context and run, as Flower's `run_clientapp.pull_task_input` pulls
    them but for the wait on an object the SuperNode is still storing: an executor that takes
    the task at once asks before the message's objects are all in, and Flower's first retry
    comes after 1 s (PULL_INITIAL_BACKOFF); here after 0.05 s, from the same machine."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    task = client.PullTaskInput(PullTaskInputRequest())
    set_task_identity(run_id=task.run.run_id, task_id=task.task_id,
                      node_id=task.context.node_id)
    context, run = context_from_proto(task.context), run_from_proto(task.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode's task holds no message")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=LOCAL_WAIT_SECONDS, backoff_cap=1.0)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's pull sets it
    return message, context, run
