"""The driver of the coverage sweep: which models to run, one process per model, the CSV of rows.

Each model runs in a process forked from a server that imported torch, torchvision and timm once,
with a wall-time limit; its row is appended to the CSV as soon as it ends. Several drivers may
share one CSV: each model is claimed with a pid file first, so that none runs twice.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT, read_csv, write_csv
from coverage_worker import BUILD_STAGES, COLUMNS, PRELOAD, child_main, list_models, noop


def select(args: argparse.Namespace) -> list[str]:
    """Keys ``source:name`` to run, in run order."""
    sources = ["tv", "timm"] if args.source == "all" else [args.source]
    if args.only and all(item.partition(":")[0] in ("tv", "timm") and ":" in item for item in args.only):
        # Fully named: no listing here (importing timm costs seconds); the worker checks the name.
        return list(dict.fromkeys(args.only))
    available = {s: list_models(s) for s in sources}
    if args.only:
        return _named(args.only, sources, available)
    keys = [f"{s}:{n}" for s in sources for n in available[s]]
    if args.order == "mixed":  # deterministic shuffle: partial sweeps and time estimates stay representative
        keys.sort(key=lambda k: hashlib.sha1(k.encode()).hexdigest())
    return keys


def _named(only: list[str], sources: list[str], available: dict[str, list[str]]) -> list[str]:
    """The keys of ``--only NAME`` / ``tv:NAME`` / ``timm:NAME``: a bare name in every source that has it."""
    keys: list[str] = []
    for item in only:
        source, _, name = item.rpartition(":")
        if source and source not in ("tv", "timm"):
            raise SystemExit(f"--only {item!r}: the prefix must be tv: or timm:")
        wanted = [source] if source else sources
        found = [f"{s}:{name}" for s in wanted if s in available and name in available[s]]
        if not found:
            raise SystemExit(f"--only {item!r}: no such model in {'/'.join(wanted)}")
        keys += [k for k in found if k not in keys]
    return keys


def file_stem(key: str) -> str:
    """A file name for ``source:name`` (claims, result files)."""
    return key.replace(":", "__").replace("/", "_")


def key_of(row: dict[str, str]) -> str:
    return f"{row['source']}:{row['model']}"


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.csv_path = args.out / "coverage.csv"
        self.claims = args.out / "coverage.claims"
        self.lock = threading.Lock()
        self.done = 0
        self.unknown = 0
        self.total = 0
        self.started = time.perf_counter()
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
        os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        warm = self.context.Process(target=noop)  # start the server now, outside every model's time limit
        warm.start()
        warm.join()

    def append(self, row: dict) -> None:
        with self.lock:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            with self.csv_path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                if new:
                    writer.writeheader()
                writer.writerow({c: row.get(c, "") for c in COLUMNS})
                f.flush()
                os.fsync(f.fileno())

    # -- claims: several drivers may share one CSV (e.g. one with --reverse), each model runs once
    def claim(self, key: str) -> bool:
        """Take ``key`` for this driver unless it has a row or a live driver holds it."""
        if key in {key_of(r) for r in read_csv(self.csv_path)} and not self.args.retry:
            return False
        self.claims.mkdir(parents=True, exist_ok=True)
        path = self.claims / (file_stem(key) + ".pid")
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                try:
                    holder = int(path.read_text() or 0)
                    os.kill(holder, 0)  # alive: another driver runs it
                    return False
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    path.unlink(missing_ok=True)  # a driver that died left it: take it over
                    continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return True
        return False

    def release(self, key: str) -> None:
        (self.claims / (file_stem(key) + ".pid")).unlink(missing_ok=True)

    # -- one model ----------------------------------------------------------------------------
    def run_one(self, key: str, tmpdir: Path) -> dict | None:
        if not self.claim(key):
            return None
        try:
            return self._run_one(key, tmpdir)
        except BaseException:
            self.release(key)
            raise

    def _run_one(self, key: str, tmpdir: Path) -> dict:
        result = tmpdir / (file_stem(key) + ".json")
        errlog = result.with_suffix(".err")
        exitcode, timed_out, wall = self._spawn(key, result, errlog)
        row = self._row_of(key, result, errlog, exitcode, timed_out, wall)
        for path in (result, errlog):
            path.unlink(missing_ok=True)
        return row

    def _spawn(self, key: str, result: Path, errlog: Path) -> tuple[int | None, bool, float]:
        """Run the worker of ``key`` in a forked process; kill its process group at the time limit."""
        child_args = argparse.Namespace(**{**vars(self.args), "worker": key, "result": str(result)})
        started = time.perf_counter()
        proc = self.context.Process(target=child_main, args=(child_args, str(errlog)))
        proc.start()
        proc.join(self.args.timeout)
        timed_out = proc.is_alive()
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
        return proc.exitcode, timed_out, round(time.perf_counter() - started, 2)

    def _row_of(self, key: str, result: Path, errlog: Path, exitcode: int | None, timed_out: bool, wall: float) -> dict:
        """The row the worker saved, completed with what the driver saw: a timeout, or a worker that died."""
        source, _, name = key.partition(":")
        row = {c: "" for c in COLUMNS}
        row.update(source=source, model=name, stage="start")
        if result.exists():
            with contextlib.suppress(json.JSONDecodeError):
                row.update(json.loads(result.read_text()))
        row["wall_s"] = wall
        stage = row.get("stage") or "start"
        if timed_out:
            reason = f"timeout ({self.args.timeout:g} s) in {stage}"
            if stage in BUILD_STAGES:
                row.update(status="not buildable", failure=reason)
            else:
                row.update(status="failed", failure=reason, round_trip_ok=row.get("round_trip_ok") or False)
        elif not row.get("status"):
            tail = errlog.read_text(errors="replace").strip().splitlines()[-1:] if errlog.exists() else []
            reason = f"worker died in {stage} (exit {exitcode})" + (f": {tail[0][:200]}" if tail else "")
            if exitcode in (-9, 137):  # SIGKILL from the kernel's OOM killer (the machine's memory is shared)
                row.update(status="not buildable", failure=reason + " (SIGKILL: out of memory?)", round_trip_ok="")
            else:
                row.update(status="failed", failure=reason, round_trip_ok=False)
        if row["status"] == "failed" and row.get("round_trip_ok") == "":
            row["round_trip_ok"] = False
        return row

    # -- the sweep ----------------------------------------------------------------------------
    def sweep(self) -> None:
        """Run every selected model that has no row yet (with ``--retry``: every selected model)."""
        keys = select(self.args)
        done = {key_of(r) for r in self._rows_kept(keys)}
        pending = [k for k in keys if k not in done]
        if self.args.reverse:
            pending.reverse()
        if self.args.limit is not None:
            pending = pending[: self.args.limit]
        self.total = len(pending)
        print(
            f"{len(keys)} selected, {len(keys) - len([k for k in keys if k not in done])} already in {self.csv_path}, "
            f"running {self.total} (jobs={self.args.jobs}, timeout={self.args.timeout:g} s)",
            flush=True,
        )
        self.started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tost-coverage-") as tmp:
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.args.jobs)) as pool:
                futures = {pool.submit(self.run_one, key, Path(tmp)): key for key in pending}
                for future in concurrent.futures.as_completed(futures):
                    self._record(futures[future], future.result())

    def _rows_kept(self, keys: list[str]) -> list[dict[str, str]]:
        """The CSV's rows; with ``--retry``, the selected models' rows are dropped from it first."""
        rows = read_csv(self.csv_path)
        if self.args.retry and rows:
            selected = set(keys)
            kept = [r for r in rows if key_of(r) not in selected]
            if len(kept) != len(rows):
                write_csv(self.csv_path, COLUMNS, kept)
                rows = kept
        return rows

    def _record(self, key: str, row: dict | None) -> None:
        """Append a finished model's row to the CSV and print the progress."""
        if row is None:  # another driver ran it or runs it now
            self.total -= 1
            return
        if row["status"] == "unknown":
            print(f"error: {row['failure']} (not recorded)", file=sys.stderr, flush=True)
            self.unknown += 1
            self.release(key)
            return
        self.append(row)
        self.release(key)
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        status = row["status"] if row["status"] != "failed" else f"FAILED: {row['failure']}"
        if row["status"] == "not buildable":
            status = f"not buildable: {row['failure']}"
        print(
            f"[{self.done}/{self.total}] {key} {row.get('traced') or '-'} "
            f"{row['wall_s']}s {status[:300]} (elapsed {elapsed / 60:.1f} min, eta {eta / 3600:.1f} h)",
            flush=True,
        )
