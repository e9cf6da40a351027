"""Bad input is one line before any work; a run directory is locked, and left as it was by a refused run."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GSM8K_PATH, REPO
from fastdllm.config import set_cpu_threads
from fastdllm.models import CheckpointError, load_model, load_tokenizer
from fastdllm.models.loading import read_config
from fastdllm.models.tiny import build_tiny_model
from fastdllm.registry import ConfigError
from fastdllm.rundir import RunDirLock, read_samples
from fastdllm.settings import validate
from fastdllm.tasks import TASKS
from test_eval import cli, compose_config, evaluate, overrides

pytestmark = pytest.mark.skipif(not GSM8K_PATH.is_file(), reason=f"{GSM8K_PATH} not found (clone next to ../shared)")


def one_line_error(result, *fragments):
    """A refused command: status 1, one line on stderr naming what is wrong, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_rows(path, rows):
    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return path


ROW = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "extra,key,listed",
    [
        ("+generation.thresold=0.5", "generation.thresold", "threshold"),
        ("+cache.bogus=1", "cache.bogus", "name"),
        ("+model.bogus=1", "model.bogus", "instruct"),
        ("+dataset.bogus=1", "dataset.bogus", "num_fewshot"),
        ("+bogus=1", "bogus", "batch_size"),
    ],
)
def test_keys_added_with_plus_are_checked_against_the_schema(tiny_llada_dir, tmp_path, extra, key, listed):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} is not a key of .*valid keys: .*\b{listed}\b"):
        validate(compose_config(overrides(tiny_llada_dir, tmp_path, extra)))


@pytest.mark.parametrize(
    "extra,message",
    [
        # gen_length comes from the dataset here, so the check runs outside the group's own schema.
        (["generation.gen_length=null", "generation.block_length=48"], "generation.block_length=48 is invalid: must divide gen_length=256"),
        (["generation.gen_length=null", "generation.steps=3"], "generation.steps=3 is invalid: must be a multiple"),
        (["seed=-1"], "seed=-1 is invalid: must be in [0, 2**64 - 1]"),
        (["seed=18446744073709551616"], "seed=18446744073709551616 is invalid"),
    ],
)
def test_values_name_their_full_key(tiny_llada_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(overrides(tiny_llada_dir, tmp_path, *extra)))


def test_length_checks_name_the_group_wherever_they_run():
    from fastdllm.generation import GENERATIONS

    config = GENERATIONS.to_config({"name": "vanilla", "block_length": 48, "steps": 5})
    with pytest.raises(ConfigError, match=r"^generation.block_length=48 is invalid"):
        config.check_lengths(256)  # as the loop and the benchmark call it
    with pytest.raises(ConfigError, match=r"^generation.steps=5 is invalid"):
        config.check_lengths(96)
    with pytest.raises(ConfigError, match=r"^generation.block_length=48 is invalid"):  # prefixed once, not twice
        GENERATIONS.to_config({"name": "vanilla", "gen_length": 64, "block_length": 48})


def test_tiny_llada_yaml_states_its_layer_count():
    comment = (REPO / "conf" / "model" / "tiny-llada.yaml").read_text().splitlines()[0]
    layers = json.loads((REPO / "fastdllm" / "assets" / "tiny-llada" / "config.json").read_text())["n_layers"]
    assert f"A {layers}-layer LLaDA" in comment


def test_cpu_threads_default_to_a_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cores = len(os.sched_getaffinity(0))
        assert set_cpu_threads(local_processes=2) == max(1, cores // 2) == torch.get_num_threads()
        assert set_cpu_threads(local_processes=4 * cores) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        assert set_cpu_threads(local_processes=2) == 3 == torch.get_num_threads()  # the environment wins
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- data files


@pytest.mark.parametrize(
    "rows,message",
    [
        ([ROW, ROW, '{"question": "x", "answer": \n'], r"line 3 is not valid JSON"),
        ([ROW, {"question": "no answer here"}], r"row 1 has no 'answer' text"),
        ([], r"holds no rows"),
        (["\n"], r"holds no rows"),
        ([ROW, ROW, {"question": "q", "answer": "the answer is five"}], r"row 2 has no '#### <number>' line"),
        (['[1, 2]\n'], r"line 1 is a JSON list, not an object"),
    ],
)
@pytest.mark.parametrize("task", ["gsm8k", "arith"])
def test_bad_data_files_name_file_and_row(tmp_path, rows, message, task):
    path = write_rows(tmp_path / "rows.jsonl", rows)
    with pytest.raises(ConfigError, match=rf"dataset.path='{re.escape(str(path))}'.*{message}"):
        TASKS.build({"name": task, "path": str(path)}).load()


def test_unreadable_parquet_is_one_error(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_text("not parquet")
    with pytest.raises(ConfigError, match=r"dataset.path=.*rows.parquet' cannot be read as parquet"):
        TASKS.build({"name": "gsm8k", "path": str(path)}).load()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(tiny_llada_dir, tmp_path):
    return Path(shutil.copytree(tiny_llada_dir, tmp_path / "checkpoint"))


def edit_config(checkpoint, **changes):
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


@pytest.mark.parametrize("field", ["n_heads", "d_model", "n_layers", "mlp_hidden_size", "vocab_size", "rope_theta", "max_sequence_length"])
def test_llada_architecture_fields_are_required(checkpoint, field):
    edit_config(checkpoint, **{field: None})
    with pytest.raises(CheckpointError, match=rf"config.json has no '{field}'; it defines the architecture"):
        read_config(checkpoint)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size"])
def test_dream_architecture_fields_are_required(tmp_path, field):
    build_tiny_model("Dream", tmp_path)
    edit_config(tmp_path, **{field: None})
    with pytest.raises(CheckpointError, match=rf"Dream config.json has no '{field}'"):
        read_config(tmp_path)


def test_damaged_checkpoints_name_the_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))} is truncated or corrupted"):
        load_model(checkpoint, torch.float32)
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="is truncated or corrupted"):
        load_model(checkpoint, torch.float32)
    weights.write_bytes(intact)

    (checkpoint / "config.json").write_text('{"model_type": "llada", "d_model": ')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_model(checkpoint, torch.float32)

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer files"):
        load_tokenizer(checkpoint)


# ---------------------------------------------------------------- before any decoding


def test_context_is_checked_over_every_row_before_decoding(tiny_llada_dir, tmp_path):
    long_question = "How many apples? " * 70  # ~1200 characters: more than the 1024-token context alone
    data = write_rows(tmp_path / "rows.jsonl", [ROW, {**ROW, "question": long_question}, ROW])
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"longest prompt \(row gsm8k-test-1\) has \d+ tokens; with gen_length=32 it needs \d+ > the model context of 1024"):
        evaluate(tiny_llada_dir, out, f"dataset.path={data}")
    assert not (out / "samples.jsonl").exists() and not (out / "config.yaml").exists()


def test_gen_length_that_cannot_fit_the_model_is_refused_up_front(tmp_path):
    model_dir = tmp_path / "short-context"
    build_tiny_model("llada", model_dir, max_sequence_length=64)
    with pytest.raises(ConfigError, match=r"the response length 64 \(dataset=arith's gen_length\) leaves no room .* context of 64 tokens"):
        validate_and_run(model_dir, tmp_path / "run")


def validate_and_run(model_dir, out):
    from fastdllm.evaluate import run

    cfg = compose_config([f"model.path={model_dir}", f"output_dir={out}", "progress=false", "limit=1"])
    return run(cfg, Path(out))


# ---------------------------------------------------------------- run directories


def test_resume_needs_a_run_there(tiny_llada_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"resume=true but output_dir=.* holds no run .*nothing there to resume"):
        evaluate(tiny_llada_dir, tmp_path / "empty", "limit=1", "resume=true")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_locked_run_directory_is_refused(tiny_llada_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunDirLock(out):
        with pytest.raises(ConfigError, match=rf"output_dir=.* is in use by process {os.getpid()} on "):
            evaluate(tiny_llada_dir, out, "limit=1")
    assert list(out.iterdir()) == []  # the lock file goes with the lock
    evaluate(tiny_llada_dir, out, "limit=1")


def test_refused_run_leaves_the_directory_as_it_was(tiny_llada_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(*overrides(tiny_llada_dir, out, "limit=2")).returncode == 0
    before = snapshot(out)
    assert ".hydra/config.yaml" in before and "samples.jsonl" in before
    one_line_error(cli(*overrides(tiny_llada_dir, out, "limit=2", "resume=true", "generation.threshold=0.5")),
                   "settings differ", "(generation.threshold: None -> 0.5)")
    one_line_error(cli(*overrides(tiny_llada_dir, out, "limit=2")), "pass resume=true")
    assert snapshot(out) == before


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["generation.thresold=0.5"], ["generation.thresold is not a key of generation; valid keys:", "threshold"]),
        (["+generation.thresold=0.5"], ["generation.thresold is not a key of generation; valid keys:", "threshold"]),
        (["+bogus=1"], ["bogus is not a key of the top level"]),
        (["seed=-1"], ["seed=-1 is invalid"]),
        (["dataset.path=BAD_JSONL"], ["line 2 is not valid JSON"]),
        (["model.path=DAMAGED_MODEL"], ["model.safetensors is truncated or corrupted"]),
    ],
)
def test_bad_input_is_one_line_without_traceback(tiny_llada_dir, tmp_path, extra, fragments):
    bad_jsonl = write_rows(tmp_path / "bad.jsonl", [ROW, "{oops\n"])
    damaged = Path(shutil.copytree(tiny_llada_dir, tmp_path / "damaged"))
    (damaged / "model.safetensors").write_bytes(b"\0" * 64)
    extra = [e.replace("BAD_JSONL", str(bad_jsonl)).replace("DAMAGED_MODEL", str(damaged)) for e in extra]
    one_line_error(cli(*overrides(tiny_llada_dir, tmp_path / "run", "limit=1"), *extra), *fragments)


def test_debug_shows_the_traceback(tiny_llada_dir, tmp_path):
    result = cli(*overrides(tiny_llada_dir, tmp_path / "run", "limit=1", "seed=-1", "debug=true"))
    assert result.returncode == 1 and "Traceback" in result.stderr and "seed=-1 is invalid" in result.stderr


def test_sweep_runs_the_good_jobs_and_lists_the_failed_one(tiny_llada_dir, tmp_path):
    out = tmp_path / "sweep"
    result = cli("-m", *overrides(tiny_llada_dir, out, "limit=1"), "generation.threshold=1.5,0.9")
    assert result.returncode == 1
    assert (out / "1" / "samples.jsonl").is_file() and not (out / "0" / "samples.jsonl").exists()
    assert "sweep: 1 of 2 jobs finished, 1 failed" in result.stderr
    assert re.search(r"job 0 \[.*generation.threshold=1.5\]: failed: generation.threshold=1.5 is invalid", result.stderr)
    assert re.search(r"job 1 \[.*generation.threshold=0.9\]: finished", result.stderr)
    assert "Traceback" not in result.stderr


def start_run(args):
    return subprocess.Popen([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_samples(process, samples, count):
    deadline = time.time() + 120
    while time.time() < deadline and not (samples.is_file() and samples.read_text().count("\n") >= count):
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)


def test_second_run_into_a_directory_in_use_is_refused(tiny_llada_dir, tmp_path):
    out = tmp_path / "run"
    args = overrides(tiny_llada_dir, out, "limit=5", "generation.gen_length=64")
    first = start_run(args)
    wait_for_samples(first, out / "samples.jsonl", 1)
    first.send_signal(signal.SIGSTOP)  # holds the directory for as long as the second run needs
    try:
        second = cli(*args, "resume=true")
    finally:
        first.send_signal(signal.SIGCONT)
    one_line_error(second, f"is in use by process {first.pid} on ")
    assert first.wait(timeout=240) == 0, first.stderr.read()
    ids = [r["id"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]
    assert ids == [f"gsm8k-test-{i}" for i in range(5)]  # every sample exactly once
    assert not (out / ".lock").exists()


def test_ctrl_c_stops_cleanly_and_resume_finishes(tiny_llada_dir, tmp_path):
    out = tmp_path / "run"
    process = start_run(overrides(tiny_llada_dir, out, "limit=6", "generation.gen_length=64"))
    wait_for_samples(process, out / "samples.jsonl", 2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    lines = process.stderr.read().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted; resume with: python {REPO / 'eval.py'} "), lines
    finished = len(read_samples(out / "samples.jsonl"))
    assert 2 <= finished < 6, "interrupted part-way"

    command = shlex.split(lines[0].split(": ", 1)[1])
    assert command[-2:] == [f"output_dir={out}", "resume=true"]
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ids = [r["id"] for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())]
    assert ids == [f"gsm8k-test-{i}" for i in range(6)]
