"""An experiment: every (run, seed) pair of a recipe, trained one after another or several at once in
worker processes, collected into the results dict that results.json holds.
"""
from __future__ import annotations

import datetime as _dt
import os
import time

import torch

from .data import Data, load_data
from .loop import train_run
from .progress import Progress, QueueProgress
from .provenance import git_state, machine_info, version
from .recipe import FP32, Recipe, RunSpec, parse_runs
from .report import summarize

_WORKER_DATA: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(spec: RunSpec, recipe: Recipe, device: str, data_path, queue) -> dict:
    key = (recipe.train_subset, recipe.test_subset, str(data_path), device)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = load_data(recipe, data_path, device)
    return train_run(spec, recipe, _WORKER_DATA[key], device, QueueProgress(queue) if queue is not None else None)


def run_experiment(recipe: Recipe, runs=(FP32, "per-tensor"), seeds=(0,), device="cpu", data_path=None,
                   jobs: int = 1, threads: int | None = None, dclrs: bool = False,
                   progress: Progress | None = None, data: Data | None = None) -> dict:
    """Train every (run, seed) pair and return {"recipe", "machine", "runs", "summary"}.

    jobs > 1 trains that many runs at once in worker processes with `threads` (default: cores // jobs)
    threads each. Why both presets do that on a CPU: a small CNN's INT8 step is hundreds of small
    memory-bound ops, and two threads on one run barely beat one; on a shared machine they are much
    worse, since every op waits for both threads (measured on 2 cores at load ~5: a smallcnn gvq-mcs step
    took 0.33 CPU-s on one thread and 2.3-4.5 s wall on two). Runs are ordered seed-major (all policies
    of seed 0 first), so a partial experiment is still a like-for-like comparison.
    """
    parsed = parse_runs(runs, dclrs)
    specs = [RunSpec(p, s, d) for s in seeds for p, d in parsed]
    dev = torch.device(device)
    if dev.type == "cuda":
        jobs = 1
    jobs = max(1, min(jobs, len(specs)))
    records: list[dict] = []
    git, started = git_state(), _dt.datetime.now().astimezone().isoformat(timespec="seconds")  # the code that runs
    t0 = time.perf_counter()
    if jobs == 1:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            data = data or load_data(recipe, data_path, dev)
            for spec in specs:
                records.append(train_run(spec, recipe, data, dev, progress))
        finally:
            torch.set_num_threads(before)
    else:
        records = _run_parallel(specs, recipe, str(dev), data_path, jobs,
                                threads or max(1, (os.cpu_count() or 1) // jobs), progress)
    return {
        "int8fx_version": version(), "git": git, "date": started,
        "machine": machine_info(dev), "device": str(dev), "jobs": jobs, "recipe": recipe.to_dict(),
        "experiment_s": time.perf_counter() - t0, "runs": records, "summary": summarize(records),
    }


def _run_parallel(specs, recipe, device, data_path, jobs, threads, progress):
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # fork after torch's thread pools have started can deadlock
    with ctx.Manager() as manager:
        q = manager.Queue() if progress is not None else None
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            futures = [ex.submit(_worker, s, recipe, device, data_path, q) for s in specs]
            while True:
                pending = [f for f in futures if not f.done()]
                if q is not None:
                    try:
                        while True:
                            ev = q.get(timeout=0.2)
                            getattr(progress, ev[0])(*ev[1:])
                    except _queue.Empty:
                        pass
                elif pending:
                    time.sleep(0.2)
                if not pending:
                    break
            if q is not None:  # drain the last events
                while not q.empty():
                    ev = q.get()
                    getattr(progress, ev[0])(*ev[1:])
            return [f.result() for f in futures]
