"""Where a process runs and how it writes: distribution, device, seeding, atomic writes, progress.

Distribution follows nanoGPT: :func:`setup_distributed` reads torchrun's ``RANK``/``WORLD_SIZE``,
initialises the process group (nccl on GPUs, gloo on CPU) and picks the device; the
:class:`DistInfo` it returns is passed down, and rank 0 (``is_master``) alone logs and writes.
:func:`resolve_device` is the one place that names the GPU backend.

Training checkpoints, histories and results.json are written with :func:`atomic_torch_save` /
:func:`atomic_write_json` (a temporary file, then ``os.replace``), so a killed run never leaves
half of one for ``--resume`` to read.
"""
from __future__ import annotations

import json
import os
import random
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor
from tqdm.auto import tqdm


# =========================================================================== distribution and device
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank, master flag and its device.

    ``owns_group``: this process's :func:`setup_distributed` call created the process group (so
    the caller that set it up also tears it down).
    """

    rank: int
    world_size: int
    local_rank: int
    is_master: bool
    device: torch.device
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def single_process(device: torch.device | str = "cpu") -> DistInfo:
    """The :class:`DistInfo` of a plain (non-torchrun) process on ``device``."""
    return DistInfo(0, 1, 0, True, torch.device(device))


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" | "cpu" | "cuda" -> a torch.device. The one place that names the GPU backend."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}); use --device cpu")
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group when ``RANK``/``WORLD_SIZE`` are set; otherwise a single process.

    Backend: nccl when the device is a GPU, gloo on CPU. A group that is already initialised is
    joined as it is (``owns_group`` False).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return single_process(resolve_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, rank == 0, dev, owns)


def cleanup_distributed() -> None:
    """Destroy the process group if one was initialised.

    Call it once the DDP-wrapped model is released (e.g. in a ``finally`` around the function
    that trained): a DDP reducer destroyed after its process group can hang the exit under gloo.
    """
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def barrier(dist: DistInfo) -> None:
    """Wait for every rank (nothing in a single process)."""
    if dist.is_distributed:
        tdist.barrier()


def all_gather(x: Tensor, with_grad: bool) -> Tensor:
    """Concatenate ``x`` (b, ...) from all ranks in rank order -> (world * b, ...); identity in one process.

    ``with_grad``: through ``torch.distributed.nn.functional.all_gather``, whose backward hands
    each rank the gradient of its own rows summed over ranks. Every rank computes the same
    global loss from the gathered tensor, so that sum is the true gradient of the global-batch
    loss, and DDP's averaging over ranks then equals the single-process gradient.
    """
    _, n = world()
    if n == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        with warnings.catch_warnings():
            # deprecated in favour of _functional_collectives.all_gather_single, which (torch 2.13,
            # gloo) aborts the process at exit; this one is still the public autograd all_gather
            warnings.filterwarnings("ignore", message=".*nn.functional.all_gather is deprecated", category=FutureWarning)
            return torch.cat(dist_fn.all_gather(x), 0)
    out = [torch.empty_like(x) for _ in range(n)]
    tdist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def autocast_context(device: torch.device) -> ContextManager:
    """bf16 autocast on GPU; nothing on CPU (fp32 keeps CPU runs exact and reproducible)."""
    if device.type == "cuda":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def set_threads(world_size: int) -> int:
    """One intra-op thread per core under torchrun's ``world_size`` processes; all cores for one. Returns it."""
    n = max(1, (os.cpu_count() or 1) // world_size)
    torch.set_num_threads(n)
    return n


# =========================================================================== seeding and RNG state
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and python ``random`` as tensors/lists (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(v) for v in internal], gauss],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# =========================================================================== atomic writes
def _atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then os.replace: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON (numpy scalars/arrays and paths converted) at ``path``, atomically."""
    text = json.dumps(obj, indent=2, default=_json_default)
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` at ``path``, atomically."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


# =========================================================================== progress
def progress(iterable: Iterable, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` on a terminal only: redirected output (a log file) gets no bar."""
    return tqdm(iterable, disable=None if show else True, file=sys.stderr, **kwargs)
