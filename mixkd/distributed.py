"""One run over many processes: the process group of a data-parallel run.

``torchrun --nproc-per-node N -m mixkd train ...`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and SLURM's ``srun`` (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; the address is the first host of the step's node list,
the port derived from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` (:func:`slurm_port`) unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set) start one
process per device; :func:`setup` joins them into one process group. Everything else asks this
module where it stands (:func:`rank`, :func:`world`, :func:`active`) and reduces through it, so a
run of one process never touches ``torch.distributed``.

The backend: NCCL when every rank has a GPU of its own, gloo on the CPU and when two ranks of a node
share one GPU (NCCL refuses that; the GPU script runs two ranks on one GPU), or what ``--dist-backend``
says. Ranks tell each other their GPU (host and UUID) through the launcher's store before choosing.
A rank that dies leaves the others blocked in a collective for at most :data:`TIMEOUT_S` (torchrun
ends them sooner: its agent stops every worker once one has failed).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mixkd.errors import MixkdError

BACKENDS = ("auto", "nccl", "gloo")
TIMEOUT_S = 600.0  # the process group's: a collective waits at most this for a dead or stuck rank
SLURM_PORT_BASE = 15_000  # MASTER_PORT under SLURM: this + (SLURM_JOB_ID + 7919 x SLURM_STEP_ID) % 20000


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch of several: what torchrun or srun said."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    addr: str
    port: int
    launcher: str  # "torchrun" or "slurm"
    agent_store: bool = False  # torchrun's agent serves the store at addr:port
    attempt: int = 0  # torchrun's restart count


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-004,010],cpu1`` -> ``gpu003`` (what
    ``scontrol show hostnames`` prints first)."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist.strip()).group(0)
    m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", first)
    if not m:
        return first
    start = re.split(r"[-,]", m.group(2))[0]
    return m.group(1) + start + m.group(3)


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    m = re.match(r"\s*(\d+)", value or "")
    if not m:
        raise MixkdError(f"the environment variable {name}={value!r} is not a number; check the launcher's settings")
    return int(m.group(1))


def slurm_port(job: int, step: int) -> int:
    """The rendezvous port of SLURM job step ``step`` of job ``job``: :data:`SLURM_PORT_BASE` + (job +
    7919 x step) % 20000. Steps of one job that run at once (``srun ... &`` twice in one allocation) get
    different ports (7919 is prime to 20000), and step 0 keeps the port of earlier versions."""
    return SLURM_PORT_BASE + (job + 7919 * step) % 20_000


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch this process is part of, or None for a process alone (one process of one).

    torchrun's variables come first (also under SLURM: ``srun torchrun ...``); else those of an
    ``srun`` job step (not the batch script's own shell, which has no step)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        if world <= 1:
            return None
        return Launch(rank=_int(env, "RANK"), world=world, local_rank=_int(env, "LOCAL_RANK", 0),
                      local_world=_int(env, "LOCAL_WORLD_SIZE", world), addr=env.get("MASTER_ADDR", "127.0.0.1"),
                      port=_int(env, "MASTER_PORT", 29500), launcher="torchrun",
                      agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
                      attempt=_int(env, "TORCHELASTIC_RESTART_COUNT", 0))
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        if world <= 1:
            return None
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1")
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(
            _int(env, "SLURM_JOB_ID", 0), _int({"s": env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")}, "s", 0))
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        return Launch(rank=_int(env, "SLURM_PROCID"), world=world, local_rank=_int(env, "SLURM_LOCALID", 0),
                      local_world=_int({"n": per_node}, "n"), addr=addr, port=port, launcher="slurm")
    return None


# ---- this process's place (set by setup) ---------------------------------------------------------
_rank, _world, _backend, _device = 0, 1, None, None
_grouped = [False]  # whether this process joined a process group (set once, by setup)


def active() -> bool:
    """Whether this process is one of several ranks of one run."""
    return _world > 1


def rank() -> int:
    return _rank


def world() -> int:
    return _world


def is_main() -> bool:
    """Rank 0 (or a process alone): the one that writes."""
    return _rank == 0


def backend() -> str | None:
    return _backend


def local_device(device: torch.device) -> torch.device:
    """This rank's device for a run asked to use ``device`` (a CUDA run of several ranks: the GPU
    :func:`setup` chose)."""
    if active() and device.type == "cuda" and _device is not None:
        return _device
    return device


def _store(launch: Launch, timeout: datetime.timedelta):
    is_server = launch.rank == 0 and not launch.agent_store
    try:
        store = dist.TCPStore(launch.addr, launch.port, launch.world, is_server, timeout=timeout,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise MixkdError(f"rank {launch.rank} of {launch.world} cannot reach the rendezvous at {launch.addr}:{launch.port} "
                         f"({first}); check MASTER_ADDR/MASTER_PORT and that the port is free") from None
    return dist.PrefixStore(f"mixkd/attempt{launch.attempt}/", store)


def choose_backend(asked: str, device: torch.device, gpus: list[str]) -> str:
    """``asked`` (auto, nccl, gloo) for a rank on ``device``; ``gpus``: every rank's "host/GPU UUID"."""
    if asked not in BACKENDS:
        raise MixkdError(f"--dist-backend must be one of {', '.join(BACKENDS)}, got {asked!r}")
    if asked != "auto":
        if asked == "nccl" and device.type != "cuda":
            raise MixkdError("--dist-backend nccl needs a GPU per rank; use gloo on the CPU")
        return asked
    return "nccl" if device.type == "cuda" and len(set(gpus)) == len(gpus) else "gloo"


def setup(device: torch.device, asked_backend: str = "auto", launch: Launch | None = None,
          timeout_s: float = TIMEOUT_S) -> torch.device:
    """Join the process group when this process was launched as one of several (:func:`launch_from_env`);
    returns this rank's device (``device`` itself for a process alone, or on the CPU)."""
    global _rank, _world, _backend, _device
    launch = launch or launch_from_env()
    if launch is None:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        device = torch.device("cuda", device.index if device.index is not None else launch.local_rank % count)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _store(launch, timeout)
    gpu = f"{socket.gethostname()}/{torch.cuda.get_device_properties(device).uuid}" if device.type == "cuda" else f"cpu{launch.rank}"
    store.set(f"gpu{launch.rank}", gpu)
    gpus = [store.get(f"gpu{r}").decode() for r in range(launch.world)]
    chosen = choose_backend(asked_backend, device, gpus)
    dist.init_process_group(chosen, store=dist.PrefixStore("pg/", store), rank=launch.rank,
                            world_size=launch.world, timeout=timeout)
    _rank, _world, _backend, _device = launch.rank, launch.world, chosen, device
    _grouped[0] = True
    return device


def was_grouped() -> bool:
    """Whether this process joined a process group (it may have left it since)."""
    return _grouped[0]


def shutdown() -> None:
    """Leave the process group (at the end of the command)."""
    global _rank, _world, _backend, _device
    if dist.is_initialized():
        dist.destroy_process_group()
    _rank, _world, _backend, _device = 0, 1, None, None


# ---- collectives (no-ops for a process alone) ------------------------------------------------------
def _on_backend(t: torch.Tensor) -> torch.Tensor:
    return t.to(_device) if _backend == "nccl" and t.device.type != "cuda" else t


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` summed (``op='sum'``) or maximized (``'max'``) over the ranks, in place; returns ``t``."""
    if not active():
        return t
    work = _on_backend(t)
    dist.all_reduce(work, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    if work is not t:
        t.copy_(work)
    return t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (the same shape on every rank: the training loaders' equal parts of a full batch)
    concatenated along dim 0 in rank order, on ``t``'s device, detached; ``t`` itself for a process alone."""
    if not active():
        return t
    work = _on_backend(t.detach().contiguous())
    parts = [torch.empty_like(work) for _ in range(_world)]
    dist.all_gather(parts, work)
    return torch.cat(parts).to(t.device)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank, in place (in one flat message per dtype)."""
    if not active() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _on_backend(torch.cat([t.detach().reshape(-1) for t in group]))
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def agree(values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over the ranks (stop and save decisions)."""
    if not active():
        return list(values)
    return [int(v) for v in all_reduce(torch.tensor(values, dtype=torch.int64), "max").tolist()]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    out = [None] * _world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
