"""Prototype (issue 16, outside src/): mlwf's Ray backend on a pool of warm, detached actors.

A fresh driver normally pays, on every job, for Ray starting new worker
processes for it and for each of them importing scikit-learn and the stage
code. Here the calls go to named, detached actors (``mlwf-pool-<i>`` in the
namespace ``mlwf-pool``) that import all of that once, when the pool is first
made, and outlive the driver: the next job, from a new process, finds them by
name and sends its calls at once.

Use (from the repository root, with a cluster already running)::

    python benchmarks/issue16/actor_pool.py run ml-training PREFIX 2 8 --backend ray --ray-address HOST:PORT ...

It is the ``mlwf`` command with the Ray backend's ``submit`` replaced by
:meth:`ActorPoolBackend.submit`; everything else (the driver, the stages, the
store, ``--transfer store``) is mlwf's own. Only ``--transfer store`` is
supported here. ``python benchmarks/issue16/actor_pool.py --kill-pool ADDRESS``
removes the actors.

This is a measurement prototype, not the design (benchmarks/README.md says
what an implementation needs: versioning of the pool against the driver's
mlwf, resource accounting, credentials). It patches the Ray backend as it
was before the reorganisation of issue 13 and runs against that code
(``git worktree add … 9976f35``), where it was measured.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future

import ray

NAMESPACE = "mlwf-pool"
PRELOAD = ("sklearn.decomposition", "sklearn.ensemble", "mlwf.engine.runner", "mlwf.workflows.training",
           "mlwf.workflows.inference", "mlwf.model", "mlwf.images")


@ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)
class PoolWorker:
    """One warm worker: imports the stage code once; runs any call it is sent."""

    def __init__(self):
        import importlib

        from threadpoolctl import threadpool_limits

        for name in PRELOAD:
            importlib.import_module(name)
        threadpool_limits(1)
        # The first call of each kind pays for lazy imports inside the libraries; pay them now.
        from PIL import Image

        Image.preinit()

    def run(self, call, ctx, env: dict[str, str]):
        from mlwf.engine import runner
        from mlwf.engine.local import _FORWARDED_ENV

        for name in [k for k in os.environ if k.startswith(_FORWARDED_ENV)]:
            del os.environ[name]
        os.environ.update(env)
        return runner.execute(call, ctx)

    def pid(self) -> int:
        return os.getpid()


def pool(size: int) -> list:
    """The pool's actors, made (detached, spread over the nodes) if they do not exist yet."""
    actors = []
    for i in range(size):
        name = f"mlwf-pool-{i}"
        try:
            actors.append(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            actors.append(PoolWorker.options(name=name, namespace=NAMESPACE, lifetime="detached",
                                             scheduling_strategy="SPREAD", get_if_exists=True).remote())
    return actors


def install() -> None:
    """Make mlwf's Ray backend send its calls to the pool (this process only)."""
    from mlwf.engine import ray as mlwf_ray
    from mlwf.engine.local import _FORWARDED_ENV

    if __name__ != "__main__":  # a script's own classes already travel by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    original_start = mlwf_ray.RayBackend.start

    def start(self) -> None:
        original_start(self)
        size = int(ray.cluster_resources().get("CPU", 1))
        self._pool = pool(size)
        self._busy = [0] * size
        self._pool_lock = threading.Lock()

    def submit(self, call, ctx) -> Future:
        if not self._joined:
            self.start()
        if ctx.transfer != "store":
            raise SystemExit("the actor-pool prototype does --transfer store only")
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
        with self._pool_lock:
            i = min(range(len(self._pool)), key=self._busy.__getitem__)  # the least busy actor
            self._busy[i] += 1
        out: Future = Future()

        def done(f) -> None:
            with self._pool_lock:
                self._busy[i] -= 1
            try:
                out.set_result(f.result())
            except BaseException as e:  # noqa: BLE001
                out.set_exception(mlwf_ray._error(e, call))

        self._pool[i].run.remote(call, ctx, env).future().add_done_callback(done)
        return out

    mlwf_ray.RayBackend.start = start
    mlwf_ray.RayBackend.submit = submit


def kill_pool(address: str) -> None:
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE:
            ray.kill(ray.get_actor(actor["name"], namespace=NAMESPACE))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kill-pool"]:
        kill_pool(sys.argv[2])
        sys.exit(0)
    install()
    from mlwf.cli import main

    sys.exit(main(sys.argv[1:]))
