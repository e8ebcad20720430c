"""Progress of training runs: tqdm bars on a terminal, plain lines in logs, nothing in tests, and a queue
that carries a worker process's events to the parent's display.

A run only calls the four `Progress` methods, so the loop does not know where its progress goes.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """Receives a run's events; the base class is silent (tests, library use)."""

    def start(self, key: str, total: int) -> None: ...
    def update(self, key: str, step: int, info: dict) -> None: ...
    def message(self, key: str, text: str) -> None: ...
    def finish(self, key: str, text: str) -> None: ...


class TqdmProgress(Progress):
    """One tqdm bar per run (at most `slots` at a time, for parallel runs); lines for evals and ends."""

    def __init__(self, slots: int = 1, file=None) -> None:
        from tqdm.auto import tqdm

        self._tqdm, self.file = tqdm, file or sys.stderr
        self.bars: dict[str, object] = {}
        self.slots = slots
        self.free = list(range(slots))
        self.slot: dict[str, int] = {}
        tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.mininterval = 0.5 if tty else 30.0  # keep nohup logs short

    def start(self, key, total):
        pos = self.free.pop(0) if self.free else len(self.slot)
        self.slot[key] = pos
        self.bars[key] = self._tqdm(total=total, desc=key, position=pos, leave=self.slots == 1,
                                    dynamic_ncols=True, mininterval=self.mininterval, file=self.file, unit="step")

    def update(self, key, step, info):
        bar = self.bars.get(key)
        if bar is not None:
            bar.set_postfix(info, refresh=False)
            bar.update(step - bar.n)

    def message(self, key, text):
        self._tqdm.write(f"{key}: {text}", file=self.file)

    def finish(self, key, text):
        bar = self.bars.pop(key, None)
        if bar is not None:
            bar.close()
        self.free.append(self.slot.pop(key, 0))
        self.free.sort()
        self._tqdm.write(f"{key}: {text}", file=self.file)


class LineProgress(Progress):
    """Plain lines for logs (nohup, CI): every eval, every `every` of the steps, and each run's end."""

    def __init__(self, file=None, every: float = 0.1) -> None:
        self.file, self.every = file or sys.stderr, every
        self.total: dict[str, int] = {}
        self.next: dict[str, int] = {}
        self.t0: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def start(self, key, total):
        self.total[key], self.next[key], self.t0[key] = total, max(1, int(total * self.every)), time.perf_counter()
        self._print(f"{key}: start, {total} steps")

    def update(self, key, step, info):
        if step >= self.next.get(key, 0):
            dt = time.perf_counter() - self.t0[key]
            self.next[key] = step + max(1, int(self.total[key] * self.every))
            self._print(f"{key}: step {step}/{self.total[key]} ({step / dt:.2f} steps/s) "
                        + " ".join(f"{k} {v}" for k, v in info.items()))

    def message(self, key, text):
        self._print(f"{key}: {text}")

    def finish(self, key, text):
        self._print(f"{key}: {text}")


class QueueProgress(Progress):
    """Forwards events from a worker process to the parent's TqdmProgress."""

    def __init__(self, queue) -> None:
        self.q = queue

    def start(self, key, total):
        self.q.put(("start", key, total))

    def update(self, key, step, info):
        self.q.put(("update", key, step, info))

    def message(self, key, text):
        self.q.put(("message", key, text))

    def finish(self, key, text):
        self.q.put(("finish", key, text))
