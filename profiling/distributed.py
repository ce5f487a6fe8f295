"""Profiling on several processes with ``torch.distributed`` (gloo on CPU, nccl on GPU).

Each rank takes a contiguous shard of the calibration sequences. Per-sequence quantities
(the Fisher projections ``v_n``) are gathered in rank order, which is the sequences' order,
so the gathered matrix is the one a single process computes; sums (layer Hessians,
Hutchinson traces, measured NLL) are all-reduced, which changes only their summation order.
Randomness is keyed by the global sequence index (``capture.seed_for``), never by the rank.

Two ways in:

- under ``torchrun`` (``WORLD_SIZE``/``RANK`` set): ``Dist.from_env()`` joins the group;
- ``spawn(nproc, target, *args)`` starts ``nproc`` local processes running
  ``target(dist, *args)`` and returns rank 0's result (``bitsack profile --nproc N``).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bitsack.errors import BitsackError, ValidationError


@dataclass(frozen=True)
class Dist:
    """This process's place in a process group (``world == 1``: no group)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        """The current group, joining one when launched by ``torchrun`` (env vars set)."""
        import torch.distributed as td

        if td.is_available() and td.is_initialized():
            return cls(td.get_rank(), td.get_world_size(), td.get_backend())
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and td.is_available() and "RANK" in os.environ:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            td.init_process_group(backend)
            return cls(td.get_rank(), td.get_world_size(), backend)
        return cls()

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``range(n)`` (blocks in rank order)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor on ``t``'s device)."""
        if not self.active:
            return t
        import torch.distributed as td

        buf = t.detach().to(self._device()).clone()
        td.all_reduce(buf)
        return buf.to(t.device)

    def sum_float(self, x: float) -> float:
        """Sum of a float64 scalar over ranks."""
        return float(self.all_reduce(torch.tensor([x], dtype=torch.float64))[0])

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``rows`` (``[n_r, ...]``, n_r may differ) in rank order."""
        if not self.active:
            return rows
        import torch.distributed as td

        dev = self._device()
        n = torch.tensor([rows.shape[0]], dtype=torch.long, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        td.all_gather(sizes, n)
        top = max(int(s) for s in sizes)
        pad = torch.zeros((top, *rows.shape[1:]), dtype=rows.dtype, device=dev)
        pad[:rows.shape[0]] = rows.to(dev)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        td.all_gather(parts, pad)
        return torch.cat([p[:int(s)] for p, s in zip(parts, sizes, strict=True)]).to(rows.device)

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": self.backend}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, threads: int, target: Callable, args: tuple,
            queue: Any) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        td.init_process_group("gloo", rank=rank, world_size=world)
        result = target(Dist(rank, world, "gloo"), *args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as exc:  # report any failure to the parent, then exit non-zero
        queue.put(("error", f"rank {rank}: {exc.__class__.__name__}: {exc}\n"
                            f"{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        if td.is_initialized():
            td.destroy_process_group()


def spawn(nproc: int, target: Callable[..., Any], *args: Any, threads: int | None = None,
          timeout_s: float | None = None) -> Any:
    """Run ``target(dist, *args)`` on ``nproc`` local CPU processes (gloo); rank 0's result.

    ``target`` must be importable by name (a module-level function): the processes are
    started with the ``spawn`` method, as CUDA and OpenMP require.

    Raises:
        ValidationError: ``nproc`` < 1.
        BitsackError: a rank failed (its message and traceback), or the timeout passed.
    """
    import multiprocessing as mp

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValidationError("nproc", f"{nproc!r}; valid: a positive integer")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, threads, target, args, queue),
                         daemon=False) for r in range(nproc)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    try:
        while queue.empty():
            failed = [p for p in procs if p.exitcode not in (None, 0)]
            if failed and queue.empty():
                time.sleep(0.5)  # give a failing rank's message time to arrive
                if queue.empty():
                    raise BitsackError(f"distributed profiling: rank {procs.index(failed[0])} "
                                       f"exited with code {failed[0].exitcode}")
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise BitsackError(f"distributed profiling: no result after {timeout_s} s")
            time.sleep(0.05)
        status, payload = queue.get()
        if status != "ok":
            raise BitsackError(f"distributed profiling failed on {payload}")
        for p in procs:
            p.join()
        return payload
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
