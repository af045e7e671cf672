"""The Ray actors that run the ClientApp in a simulation: fedlora's own, some started with Ray.

Flower's simulation engine makes its actor pool only once the run starts, after the input
checks, and its actor class lives in `flwr.simulation`, whose package import (1.1 s of CPU:
its app, LinkState, SQLAlchemy, Alembic) each client process would pay before its first
message. So fedlora starts the actors that may load at once (simulations/startup.py) as soon as Ray
is up, while the checks and the ServerApp still prepare, with a class of its own that honours
Flower's actor contract (`run` and `terminate`, errors raised as ClientAppException), and hands
them to Flower's pool when the run builds it. Flower 1.41's pool has no such option:
`flower_pool_takes` stands in for `BasicActorPool.add_actors_to_pool` during the run (through
common/flower_compat.py). This module imports only the standard library at the top: the driver
makes the actors without importing flwr, and no client process imports flwr.simulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class SiteActor:
    """One client process of the simulation: runs the ClientApp on the messages it is given."""

    def run(self, client_app_fn: Any, message: Any, cid: str, context: Any) -> tuple:
        from common.flower_compat import ClientAppException, LoadClientAppError

        try:
            reply = client_app_fn()(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as err:  # Flower turns this into the reply's error, as for its own
            raise ClientAppException(str(err)) from err
        return cid, reply, context

    def terminate(self) -> None:
        import ray

        ray.actor.exit_actor()


def pool_capacity(resources: dict) -> int:
    """How many actors of `resources` the Ray cluster holds, node by node, as Flower counts.
    Not Flower's pool_size_from_resources itself: importing it right after ray.init (its
    package, 1.3 s of GIL-bound imports beside the checks) delayed the actors by 2.5 s here."""
    import ray

    total = 0
    for node in ray.nodes():
        available = node["Resources"]
        if not available:  # a node that left
            continue
        actors = int(available.get("CPU", 0) / resources["num_cpus"])
        if resources.get("num_gpus", 0) > 0:
            actors = min(actors, int(available.get("GPU", 0) / resources["num_gpus"]))
        total += actors
    return total


def start_site_actors(resources: dict, count: int) -> list:
    """`count` actors, created now: Ray starts their processes, which warm up at once."""
    import ray

    actor = ray.remote(SiteActor).options(**resources)
    return [actor.remote() for _ in range(count)]


@contextlib.contextmanager
def flower_pool_takes(started: list) -> Iterator[None]:
    """While open, Flower's actor pool takes the actors in `started` (emptied as it takes
    them) and makes any more as SiteActors."""
    from common.flower_compat import actor_pool_adds_with

    def add_actors_to_pool(pool: Any, num_actors: int) -> None:
        taken = started[:num_actors]
        del started[:num_actors]
        more = start_site_actors(pool.client_resources, num_actors - len(taken))
        pool.pool.extend(taken + more)
        pool.num_actors += num_actors

    with actor_pool_adds_with(add_actors_to_pool):
        yield
