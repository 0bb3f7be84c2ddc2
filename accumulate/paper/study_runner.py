"""Runs a whole batch-size study: every planned run in worker processes.

`run_study` trains the runs `accumulate.paper.study_plan.plan` lists, each in
a worker process with one TensorFlow thread, extends a learning-rate grid
once where its best rate lies at the grid's edge, and writes into ``out``:

* ``runs/<dataset>/<optimizer>/<name>.json``: one record per run
  (`accumulate.paper.study_run.run_one`);
* ``study.json``: the settings, the planned grids, timing and the run index.

The report is built from these files by `accumulate.paper.study_report`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accumulate.paper.study_plan import (
    RunSpec,
    StudySettings,
    learning_rate_grids,
    plan,
)
from accumulate.paper.study_records import Record, edge_extension
from accumulate.paper.study_run import run_one
from accumulate.paper.workers import spawn_pool, use_one_thread

__all__ = ["run_study"]


def _run_logged(spec: RunSpec, out: Path) -> Record:
    """Runs ``spec`` (or reuses its file) and writes it under ``out``."""
    path = out / spec.relative_path()
    if path.exists():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("spec") == spec.to_dict():
            record["reused"] = True
            return record
    record = run_one(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(path)
    return record


def _start_worker() -> None:
    import tensorflow as tf

    use_one_thread()
    # Every run builds and traces a new model, which TensorFlow reports as
    # "excessive retracing" of Keras's train function: expected here.
    tf.get_logger().setLevel("ERROR")


def _describe(record: Record) -> str:
    spec = record["spec"]
    reached = record.get("to_target")
    outcome = (
        f"target at epoch {reached['epochs']} ({reached['updates']} updates)"
        if reached
        else f"{record['stopped']} after {len(record['history']['epoch_seconds'])} "
        "epochs"
    )
    return (
        f"{spec['dataset']} {spec['optimizer']} {spec['arm']} N={spec['window']} "
        f"lr={spec['learning_rate']:g}: {outcome}, {record.get('seconds', 0):.1f}s"
        + (" (reused)" if record.get("reused") else "")
    )


def run_study(
    settings: StudySettings,
    out: str | os.PathLike[str],
    jobs: int = 2,
    max_minutes: float | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Runs every planned run (and edge extensions); writes ``study.json``.

    Runs whose JSON already exists with the same spec are reused, so an
    interrupted study continues where it stopped. With ``max_minutes``, no
    run starts after that much wall time: the ones left are listed as
    ``not_run`` in ``study.json`` and the report says so.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    specs = plan(settings)
    total = len(specs)
    records: dict[str, Record] = {}
    by_group: dict[tuple[str, ...], list[str]] = {}
    pending_in_group: dict[tuple[str, ...], int] = {}
    extensions: dict[tuple[str, ...], int] = {}
    for spec in specs:
        pending_in_group[spec.group] = pending_in_group.get(spec.group, 0) + 1
    not_run: list[dict[str, Any]] = []  # the specs left out

    def finished(spec: RunSpec, record: Record) -> RunSpec | None:
        key = str(spec.relative_path())
        records[key] = record
        by_group.setdefault(spec.group, []).append(key)
        pending_in_group[spec.group] -= 1
        log(
            f"[{len(records)}/{total}] {_format_minutes(time.perf_counter() - start)} "
            + _describe(record)
        )
        if (
            not settings.extend_edges
            or spec.arm == "paper"
            or pending_in_group[spec.group] > 0
        ):
            return None
        rate = edge_extension(
            [records[k] for k in by_group[spec.group]], extensions.get(spec.group, 0)
        )
        if rate is None:
            return None
        extensions[spec.group] = extensions.get(spec.group, 0) + 1
        pending_in_group[spec.group] += 1
        return replace(spec, learning_rate=rate)

    def out_of_time() -> bool:
        return (
            max_minutes is not None and time.perf_counter() - start > 60 * max_minutes
        )

    if jobs <= 1:
        queue = list(specs)
        while queue:
            spec = queue.pop(0)
            if out_of_time():
                not_run.append(spec.to_dict())
                continue
            extra = finished(spec, _run_logged(spec, out))
            if extra is not None:
                total += 1
                queue.append(extra)
    else:
        with spawn_pool(jobs, _start_worker) as pool:
            futures: dict[Future[Record], RunSpec] = {
                pool.submit(_run_logged, spec, out): spec for spec in specs
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = futures[future]
                    if future.cancelled():
                        not_run.append(spec.to_dict())
                        continue
                    try:
                        record = future.result()
                    except Exception as error:  # one failed run must not stop all
                        log(f"FAILED {spec.name} ({spec.dataset}): {error!r}")
                        not_run.append({**spec.to_dict(), "error": repr(error)})
                        pending_in_group[spec.group] -= 1
                        continue
                    extra = finished(spec, record)
                    if extra is not None and out_of_time():
                        not_run.append(extra.to_dict())
                    elif extra is not None:
                        total += 1
                        new = pool.submit(_run_logged, extra, out)
                        futures[new] = extra
                        pending.add(new)
                if out_of_time():
                    for future in pending:
                        future.cancel()  # only those not yet started

    seconds = time.perf_counter() - start
    invocation = {
        "command": command,
        "started_at": started_at,
        "wall_seconds": seconds,
        "runs_trained": sum(not r.get("reused") for r in records.values()),
        "runs_reused": sum(bool(r.get("reused")) for r in records.values()),
    }
    summary = {
        # Every invocation that wrote into this folder with these settings:
        # a study cut by --max-minutes and continued reuses the finished runs.
        "invocations": [*_previous_invocations(out, settings), invocation],
        "settings": settings.to_dict(),
        "command": command,
        "jobs": jobs,
        "max_minutes": max_minutes,
        "started_at": started_at,
        "wall_seconds": seconds,
        "learning_rate_grids": learning_rate_grids(settings),
        "runs": sorted(records),
        "not_run": not_run,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
    }
    (out / "study.json").write_text(
        json.dumps(summary, indent=1, allow_nan=False), encoding="utf-8"
    )
    log(f"{len(records)} runs in {_format_minutes(seconds)}; results in {out}")
    return summary


def _previous_invocations(out: Path, settings: StudySettings) -> list[dict[str, Any]]:
    """The invocations recorded in ``out/study.json`` for the same settings."""
    try:
        previous = json.loads((out / "study.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if previous.get("settings") != json.loads(json.dumps(settings.to_dict())):
        return []
    return previous.get("invocations") or [
        {key: previous.get(key) for key in ("command", "started_at", "wall_seconds")}
    ]


def _format_minutes(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
