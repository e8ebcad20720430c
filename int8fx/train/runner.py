"""An experiment: every (run, seed) pair of a recipe, trained one after another or several at once in
worker processes, collected into the results dict that results.json holds; with a `RunStore`, runs
that already finished are read back and each new one is saved as it ends (resumable grids).
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
from .summary import summarize
from .store import RunStore

_WORKER_DATA: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker(spec: RunSpec, recipe: Recipe, device: str, data_path, queue) -> dict:
    key = (recipe.train_subset, recipe.test_subset, str(data_path), device)
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = load_data(recipe, data_path, device)
    return train_run(spec, recipe, _WORKER_DATA[key], device, QueueProgress(queue) if queue is not None else None)


def order_specs(kinds, seeds) -> list[RunSpec]:
    """Every (run, seed) pair in training order: seed-major (all runs of seed 0 first), so a partial
    experiment is still a like-for-like comparison; runs that set their own rounding come after all
    seeds of the others (the recipe's rounding first), so a grid over both roundings completes its
    first table before it starts the second."""
    groups = [None] + [r for r in dict.fromkeys(k.rounding for k in kinds) if r is not None]
    return [RunSpec(k.policy, s, k.dclrs, k.rounding) for g in groups for s in seeds for k in kinds if k.rounding == g]


class RunsFailed(RuntimeError):
    """Some runs raised; the others finished (and are in the store, if there is one)."""


def run_experiment(recipe: Recipe, runs=(FP32, "per-tensor"), seeds=(0,), device="cpu", data_path=None,
                   jobs: int = 1, threads: int | None = None, dclrs: bool = False,
                   progress: Progress | None = None, data: Data | None = None, store: RunStore | None = None) -> dict:
    """Train every (run, seed) pair and return {"recipe", "machine", "runs", "summary"}.

    jobs > 1 trains that many runs at once in worker processes with `threads` (default: cores // jobs)
    threads each. Why both presets do that on a CPU: a small CNN's INT8 step is hundreds of small
    memory-bound ops, and two threads on one run barely beat one; on a shared machine they are much
    worse, since every op waits for both threads (measured on 2 cores at load ~5: a smallcnn gvq-mcs step
    took 0.33 CPU-s on one thread and 2.3-4.5 s wall on two). Order: `order_specs`.

    store: runs found there are read back instead of trained (`reused` in the result lists them), and
    every run is saved there the moment it finishes. A run that raises does not stop the others;
    RunsFailed is raised once they are done.
    """
    specs = order_specs(parse_runs(runs, dclrs), seeds)
    stored = {s: store.load(s) for s in specs} if store is not None else {}
    todo = [s for s in specs if stored.get(s) is None]
    dev = torch.device(device)
    if dev.type == "cuda":
        jobs = 1
    jobs = max(1, min(jobs, len(todo) or 1))
    git, started = git_state(), _dt.datetime.now().astimezone().isoformat(timespec="seconds")  # the code that runs
    t0 = time.perf_counter()
    new: dict[RunSpec, dict] = {}
    failed: dict[RunSpec, BaseException] = {}

    def finished(spec: RunSpec, rec: dict | None, error: BaseException | None = None) -> None:
        if error is not None:
            failed[spec] = error
            if progress is not None:
                progress.message(f"{spec.label} s{spec.seed}", f"FAILED: {type(error).__name__}: {error}")
            return
        rec["git"], rec["finished"] = git, _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        new[spec] = rec
        if store is not None:
            store.save(spec, rec)

    if not todo:
        pass
    elif jobs == 1:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            data = data or load_data(recipe, data_path, dev)
            for spec in todo:
                try:
                    rec = train_run(spec, recipe, data, dev, progress)
                except Exception as e:  # noqa: BLE001 - reported, and raised below once the others ran
                    finished(spec, None, e)
                else:
                    finished(spec, rec)
        finally:
            torch.set_num_threads(before)
    else:
        _run_parallel(todo, recipe, str(dev), data_path, jobs, threads or max(1, (os.cpu_count() or 1) // jobs),
                      progress, finished)
    experiment_s = time.perf_counter() - t0
    sessions = store.log_session({"started": started, "wall_s": experiment_s, "trained": len(new),
                                  "failed": len(failed), "git": git, "jobs": jobs}) if store is not None else None
    if failed:
        first = next(iter(failed.values()))
        raise RunsFailed(f"{len(failed)} of {len(todo)} runs failed ("
                         + ", ".join(f"{s.label} seed {s.seed}" for s in failed) + f"); first: {first!r}") from first
    records = [stored.get(s) or new[s] for s in specs]
    results = {
        "int8fx_version": version(), "git": git, "date": started,
        "machine": machine_info(dev), "device": str(dev), "jobs": jobs, "recipe": recipe.to_dict(),
        "experiment_s": experiment_s, "runs": records, "summary": summarize(records),
        "reused": [f"{s.label} s{s.seed}" for s in specs if stored.get(s) is not None],
    }
    if sessions is not None:
        results["sessions"], results["wall_s_total"] = sessions, sum(x["wall_s"] for x in sessions)
    return results


def _run_parallel(specs, recipe, device, data_path, jobs, threads, progress, finished):
    """Train `specs` in `jobs` worker processes; `finished(spec, record, error)` is called in this process
    as each run ends, in the order they end."""
    import multiprocessing as mp
    import queue as _queue
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")  # fork after torch's thread pools have started can deadlock
    with ctx.Manager() as manager:
        q = manager.Queue() if progress is not None else None

        def drain(block: bool) -> None:
            """Show the queued progress events (waiting up to 0.2 s for the first if `block`)."""
            if q is None:
                return
            try:
                ev = q.get(timeout=0.2) if block else q.get_nowait()
                while True:
                    getattr(progress, ev[0])(*ev[1:])
                    ev = q.get_nowait()
            except _queue.Empty:
                pass

        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as ex:
            futures = {ex.submit(_worker, s, recipe, device, data_path, q): s for s in specs}
            while futures:
                if q is not None:
                    drain(block=True)
                else:
                    time.sleep(0.2)
                for f in [f for f in futures if f.done()]:
                    drain(block=False)  # the run's last events before its result
                    spec = futures.pop(f)
                    error = f.exception()
                    finished(spec, None if error else f.result(), error)
