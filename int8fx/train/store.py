"""Finished runs on disk, one JSON file per (run, seed), so that an experiment can stop and resume.

An ablation grid takes hours; a run that already finished in the output folder is read back instead
of trained again. Each file holds the recipe it was trained with, and a stored run is reused only for
the same recipe: a folder holding runs of another recipe is an error, never a silent mix. Files are
written atomically (a temporary name, then a rename), so an interrupted write leaves no half run.
The folder also keeps a log of the sessions that worked on it, so the total wall time of a grid
trained over several sessions is known.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .recipe import Recipe, RunSpec

RUNS_DIR = "runs"
SESSIONS_FILE = "sessions.json"


class StoreMismatch(ValueError):
    """The output folder holds runs of a different recipe."""


def _plain(obj):
    """JSON round trip: tuples become lists, so a recipe compares equal to its stored copy."""
    return json.loads(json.dumps(obj, default=str))


def _write_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


class RunStore:
    """`folder/runs/<label>_s<seed>.json` for every finished run of `recipe` (a Recipe.to_dict())."""

    def __init__(self, folder, recipe: dict) -> None:
        self.folder = Path(folder)
        self.dir = self.folder / RUNS_DIR
        self.recipe = _plain(recipe)

    def path(self, spec: RunSpec) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9.+-]", "_", spec.label) + f"_s{spec.seed}.json")

    def load(self, spec: RunSpec) -> dict | None:
        """The stored record of `spec`, or None if it has not finished. Raises StoreMismatch if the
        stored run was trained with another recipe."""
        p = self.path(spec)
        if not p.exists():
            return None
        stored = json.loads(p.read_text())
        # a Recipe field added after the run was stored had its default value then
        theirs = {**_plain(Recipe().to_dict()), **stored.get("recipe", {})}
        if theirs != self.recipe:
            diff = sorted(k for k in set(self.recipe) | set(theirs) if self.recipe.get(k) != theirs.get(k))
            raise StoreMismatch(f"{p} was trained with another recipe (differs in: {', '.join(diff)}); "
                                f"choose another --out, or delete the folder to start over")
        rec = stored["run"]
        if (rec["label"], rec["seed"]) != (spec.label, spec.seed):
            raise StoreMismatch(f"{p} holds run {rec['label']!r} seed {rec['seed']}, "
                                f"not {spec.label!r} seed {spec.seed}")
        return rec

    def save(self, spec: RunSpec, record: dict) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(spec)
        _write_atomic(p, {"recipe": self.recipe, "run": record})
        return p

    def sessions(self) -> list[dict]:
        p = self.folder / SESSIONS_FILE
        return json.loads(p.read_text()) if p.exists() else []

    def log_session(self, session: dict) -> list[dict]:
        """Append one session (start, wall time, runs trained) and return them all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        all_ = self.sessions() + [_plain(session)]
        _write_atomic(self.folder / SESSIONS_FILE, all_)
        return all_
