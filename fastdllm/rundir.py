"""A run directory: the files an evaluation writes there, the checks before it may write, and the
lock that keeps two runs out of one directory.

    config.yaml     the resolved config, written once the run is accepted
    samples.jsonl   one line per finished sample, appended as batches finish (what resume reads)
    results.json    the metrics over every sample, written at the end

A run holds an flock on `<run_dir>/.lock` from before it looks at the directory until it ends; the
file names the holder, for the message a second run gets. The kernel drops an flock when its
process dies, however it dies, so a killed run leaves at most a file that the next run takes over.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from fastdllm.registry import ConfigError

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Keys that may differ between a run and its resumption without changing any sample's output.
RESUMABLE_KEYS = {"resume", "limit", "batch_size", "progress", "logger", "output_dir", "debug"}


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Finished samples, in the order written; a line cut off by a crash is dropped from the file."""
    if not path.is_file():
        return []
    records, seen, valid_bytes = [], set(), 0
    with path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break  # the last, partially written line of a killed run
            if not raw.endswith(b"\n"):
                break
            valid_bytes += len(raw)
            if record["id"] not in seen:
                seen.add(record["id"])
                records.append(record)
    if valid_bytes != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(valid_bytes)
    return records


def append_samples(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def flat_keys(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"generation": {"threshold": 0.9}} -> {"generation.threshold": 0.9}"""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(run_dir: Path, resolved: dict[str, Any], resume: bool) -> None:
    """Refuse a run that would overwrite finished samples, or resume something that is not the same run.
    Reads the directory only: nothing is written into it before the run is accepted."""
    has_samples = (run_dir / SAMPLES_FILE).is_file() and (run_dir / SAMPLES_FILE).stat().st_size > 0
    if has_samples and not resume:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds {SAMPLES_FILE}: pass resume=true to continue that run, "
            "or choose another output_dir"
        )
    saved = run_dir / CONFIG_FILE
    if resume and not saved.is_file():
        raise ConfigError(
            f"resume=true but output_dir={str(run_dir)!r} holds no run (no {CONFIG_FILE}): nothing there to resume; "
            "point output_dir at a run directory, or drop resume=true to start a new run"
        )
    if resume:
        before, now = flat_keys(OmegaConf.to_container(OmegaConf.load(saved))), flat_keys(resolved)
        changed = [
            f"{key}: {before.get(key, '<unset>')} -> {now.get(key, '<unset>')}"
            for key in sorted(before.keys() | now.keys())
            if key.split(".")[0] not in RESUMABLE_KEYS and before.get(key) != now.get(key)
        ]
        if changed:
            raise ConfigError(
                f"resume=true but settings differ from the run in {run_dir} ({'; '.join(changed)}); "
                "resume with that run's settings"
            )


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(
                    f"output_dir={str(self.run_dir)!r} is in use by {holder}: wait for that run to end, "
                    "or choose another output_dir"
                ) from None
            except OSError as err:
                os.close(fd)
                raise ConfigError(f"output_dir={str(self.run_dir)!r} cannot be locked ({err})") from None
            # The previous holder removes the file as it releases it; a lock on the removed file
            # guards nothing, so lock the file that is there now.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Removed while still locked, so the directory is left as it was found.
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
