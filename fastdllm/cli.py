"""What eval.py does around a run: bad input as one line, Ctrl-C as a resume hint, the Hydra record
of an accepted run, and a sweep whose failing jobs fail alone and are listed at its end.

Errors are reported here, not by Hydra: with HYDRA_FULL_ERROR=1 or `debug=true` an error shows its
traceback; otherwise bad input (a wrong key or value, a bad data file or checkpoint) is one line
and exit status 1, and a Ctrl-C is one line and exit status 130.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fastdllm.rundir import CONFIG_FILE
from fastdllm.models import CheckpointError
from fastdllm.registry import ConfigError, unknown_key_message

# Errors that mean "the input is wrong", as opposed to a bug: reported as one line. An OSError
# names the path it could not read or write (an output_dir without write permission, a full disk).
INPUT_ERRORS = (ConfigError, CheckpointError, OSError)
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT
# Read before main_guard sets it for Hydra's sake.
FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR") == "1"


def tracebacks_wanted() -> bool:
    """HYDRA_FULL_ERROR=1 in the user's environment, or debug=true on the command line."""
    return FULL_ERROR or any(arg in ("debug=true", "debug=True") for arg in sys.argv[1:])


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """One line on stderr, from the main process only (the others hit the same error)."""
    if is_main_process():
        print(" ".join(message.split()), file=sys.stderr, flush=True)


def main_guard(hydra_main: Callable[[], Any]) -> None:
    """Run a @hydra.main function; a bad command line (unknown option or key, a value of the wrong
    type, a syntax error) that Hydra reports in several lines becomes one line."""
    wanted = tracebacks_wanted()
    # Hydra otherwise prints its own multi-line report and exits before this function sees the error.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException, OSError) as err:  # OSError: Hydra creating the run directory
        if wanted:
            raise
        say(f"error: {composition_error(err)}")
        sys.exit(1)


def composition_error(err: Exception) -> str:
    cause = err.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(cause.object_type):
        # An unknown key without `+`: Hydra suggests adding it with `+`, which would be refused too.
        return unknown_key_message(cause.full_key, cause.object_type)
    if isinstance(cause, OmegaConfBaseException):
        return f"{err} {cause.msg.splitlines()[0]}"
    # An unknown option: keep the options Hydra lists, not where it searched for them.
    return str(err).split("Config search path")[0]


@dataclass
class JobFailure:
    """What a failed sweep job returns (instead of raising), so that the other jobs still run."""

    message: str


def run_job(cfg: DictConfig, run: Callable[..., Any]) -> Any:
    """The body of eval.py's task function: run(cfg, run_dir, on_accept=...) with errors reported."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    debug = tracebacks_wanted() or bool(cfg.get("debug", False))
    job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}): " if sweep else ""
    try:
        return run(cfg, run_dir, on_accept=lambda accepted_dir: save_hydra_record(accepted_dir, cfg))
    except KeyboardInterrupt:
        say(f"{job}{interrupted_message(run_dir)}")
        sys.exit(EXIT_INTERRUPTED)
    except INPUT_ERRORS as err:
        if debug:
            raise
        say(f"error: {job}{err}")
        if not sweep:
            sys.exit(1)
        return JobFailure(str(err))
    except Exception as err:  # a bug: keep its traceback; in a sweep, the other jobs still run
        if debug or not sweep:
            raise
        traceback.print_exc()
        return JobFailure(f"{type(err).__name__}: {err}")


def save_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's own record of the run (.hydra/config.yaml, hydra.yaml, overrides.yaml), written once
    the run is accepted: conf/config.yaml turns Hydra's early copy off so that a refused run cannot
    overwrite the record of the run already in the directory."""
    hydra_cfg = HydraConfig.get()
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    OmegaConf.save(cfg, record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")


def interrupted_message(run_dir: Path) -> str:
    if not (run_dir / CONFIG_FILE).is_file():
        return "interrupted before the run started; nothing was written"
    hydra_cfg = HydraConfig.get()
    kept = [o for o in hydra_cfg.overrides.task if o.lstrip("+~").split("=")[0] not in ("output_dir", "resume")]
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["python"] if processes == 1 else ["accelerate", "launch", "--num_processes", str(processes)]
    command = [*launcher, sys.argv[0], *kept, f"output_dir={run_dir}", "resume=true"]
    return f"interrupted; resume with: {' '.join(shlex.quote(part) for part in command)}"


class SweepSummary(Callback):
    """Lists a sweep's jobs at its end: which finished and which failed, and why; exit status 1
    when any failed."""

    def __init__(self) -> None:
        # (job number, its overrides, why it failed or None)
        self.jobs: list[tuple[int, str, Optional[str]]] = []

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        outcome = job_return.return_value
        failure = outcome.message if isinstance(outcome, JobFailure) else None
        self.jobs.append((config.hydra.job.num, " ".join(job_return.overrides or []), failure))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_main_process() or not self.jobs:
            return
        failed = [job for job in self.jobs if job[2] is not None]
        print(f"sweep: {len(self.jobs) - len(failed)} of {len(self.jobs)} jobs finished, {len(failed)} failed "
              f"(run directories under {config.hydra.sweep.dir})", file=sys.stderr)
        for num, overrides, failure in self.jobs:
            outcome = f"failed: {' '.join(failure.split())}" if failure else "finished"
            print(f"  job {num} [{overrides}]: {outcome}", file=sys.stderr)
        if failed:
            sys.exit(1)
