"""Multi-process start-up: the single place that calls `jax.distributed.initialize`.

Every host runs the same program. Where the coordinates come from, first match wins:
  1. the config (`distributed.coordinator_address`, `num_processes`, `process_id`);
  2. the environment: R1JAX_COORDINATOR_ADDRESS, R1JAX_NUM_PROCESSES, R1JAX_PROCESS_ID
     (set by launch/multihost.sh and launch/local.py);
  3. a cluster JAX detects itself: a Cloud TPU pod slice, or a SLURM job with several tasks.
With none of them this is a single-process run and nothing is initialised.

On CPU the collectives between processes go through gloo. `heartbeat_timeout` bounds how long a
process waits on a peer that died: the coordination service then fails every other process with
an error instead of letting it hang.
"""

from __future__ import annotations

import os

import jax

from r1jax.config import ConfigError, DistributedConfig

ENV_ADDRESS, ENV_COUNT, ENV_ID = "R1JAX_COORDINATOR_ADDRESS", "R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment: {name}={raw!r} is not an integer") from None


def _cluster_detected() -> bool:
    on_tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return on_tpu_pod or ("SLURM_JOB_ID" in os.environ and slurm_tasks > 1)


def initialize(cfg: DistributedConfig) -> bool:
    """Initialise the multi-process runtime if this is a multi-process run. Returns whether it did.

    Idempotent: a second call (e.g. a pipeline running several stages) does nothing.
    """
    if jax.distributed.is_initialized():
        return True
    address = cfg.coordinator_address or os.environ.get(ENV_ADDRESS, "")
    count = cfg.num_processes or _env_int(ENV_COUNT) or 0
    pid = cfg.process_id if cfg.process_id >= 0 else _env_int(ENV_ID)
    timeouts = {"initialization_timeout": cfg.initialization_timeout,
                "heartbeat_timeout_seconds": cfg.heartbeat_timeout}
    if address:
        if count <= 1 or pid is None or not 0 <= pid < count:
            raise ConfigError(f"distributed: coordinator {address} needs num_processes > 1 and 0 <= process_id < "
                              f"num_processes (got {count}, {pid}); set them in the config or via {ENV_COUNT} "
                              f"and {ENV_ID}")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=pid, **timeouts)
        return True
    if _cluster_detected():
        jax.distributed.initialize(**timeouts)
        return True
    return False
