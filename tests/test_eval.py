"""The Hydra app end to end: outputs, validation errors, resume after a crash, multi-process runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import fastdllm.cache  # noqa: F401
import fastdllm.config  # noqa: F401
import fastdllm.generation  # noqa: F401
import fastdllm.loggers  # noqa: F401
import fastdllm.reuse  # noqa: F401
import fastdllm.tasks  # noqa: F401
from conftest import GSM8K_PATH, REPO
from fastdllm.evaluate import run
from fastdllm.registry import ConfigError
from fastdllm.rundir import read_samples
from fastdllm.settings import validate

pytestmark = pytest.mark.skipif(not GSM8K_PATH.is_file(), reason=f"{GSM8K_PATH} not found (clone next to ../shared)")


def overrides(model_dir, out, *extra):
    return [
        "model=llada-inst",
        f"model.path={model_dir}",
        "dataset=gsm8k",
        f"dataset.path={GSM8K_PATH}",
        "generation=vanilla",
        "generation.gen_length=32",
        "generation.block_length=16",
        f"output_dir={out}",
        "progress=false",
        *extra,
    ]


def compose_config(args):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=args)


def evaluate(model_dir, out, *extra):
    cfg = compose_config(overrides(model_dir, out, *extra))
    return run(cfg, Path(out))


def cli(*args, launcher=(sys.executable,), timeout=240):
    return subprocess.run([*launcher, str(REPO / "eval.py"), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


def by_id(out_dir):
    return {r["id"]: r for r in read_samples(Path(out_dir) / "samples.jsonl")}


def test_run_writes_outputs_and_threshold_needs_fewer_passes(tiny_llada_dir, tmp_path):
    vanilla = evaluate(tiny_llada_dir, tmp_path / "vanilla", "limit=4")
    parallel = evaluate(tiny_llada_dir, tmp_path / "parallel", "limit=4", "generation=parallel")
    for name in ("config.yaml", "samples.jsonl", "results.json"):
        assert (tmp_path / "vanilla" / name).is_file()
    saved = json.loads((tmp_path / "vanilla" / "results.json").read_text())
    assert saved["samples"] == 4 and saved["nfe_mean"] == 32 == vanilla["nfe_mean"]
    assert parallel["nfe_mean"] <= vanilla["nfe_mean"]
    # Which engine ran and what fell back (here: eager on the CPU, nothing), and the warm-up apart.
    assert (saved["engine"], saved["engine_fallbacks"], saved["warmup_seconds"]) == ("eager", [], 0.0)
    compiled = evaluate(tiny_llada_dir, tmp_path / "compiled", "limit=4", "engine=compiled")
    assert compiled["engine"] == "compiled" and compiled["nfe_mean"] == vanilla["nfe_mean"]
    assert compiled["engine_fallbacks"] == ["engine=compiled on cpu: the forward runs without compiled kernels or CUDA graphs"]
    records = list(by_id(tmp_path / "vanilla").values())
    assert [r["id"] for r in records] == [f"gsm8k-test-{i}" for i in range(4)]
    for r in records:
        assert {"prompt", "output", "extracted", "gold", "correct", "nfe", "positions", "tokens", "latency_s"} <= set(r)
        assert sum(r["committed_per_step"]) == 32


@pytest.mark.parametrize(
    "extra,message",
    [
        (["generation.threshold=1.5"], r"generation.threshold=1.5 is invalid: must be in \(0, 1\]"),
        (["generation.threshold=0"], r"generation.threshold=0.0 is invalid"),
        (["generation.block_length=12"], r"generation.block_length=12 is invalid: must divide gen_length=32"),
        (["generation.steps=3"], r"generation.steps=3 is invalid: must be a multiple of the number of blocks \(2"),
        (["generation.block_length=-8"], r"generation.block_length=-8 is invalid: must be >= 1"),
        (["generation.gen_length=-1"], r"generation.gen_length=-1 is invalid"),
        (["batch_size=0"], r"batch_size=0 is invalid: must be >= 1"),
        (["generation.remasking=best"], r"generation.remasking='best' is invalid: choose one of"),
        (["dtype=float8"], r"dtype='float8' is invalid: choose one of"),
        (["dataset.num_fewshot=-2"], r"dataset.num_fewshot=-2 is invalid"),
    ],
)
def test_bad_values_name_the_key(tiny_llada_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(overrides(tiny_llada_dir, tmp_path, *extra)))


def test_unknown_option_and_missing_path_fail_clearly(tiny_llada_dir, tmp_path):
    result = cli(*overrides(tiny_llada_dir, tmp_path / "a", "cache=nonexistent"))
    assert result.returncode != 0
    assert "Could not find 'cache/nonexistent'" in result.stderr and "Available options" in result.stderr
    assert "none" in result.stderr and "_schema" not in result.stderr  # only real options are listed
    result = cli(*overrides(tmp_path / "no-such-model", tmp_path / "b"))
    assert result.returncode != 0
    assert "model.path=" in result.stderr and "does not exist" in result.stderr


def test_prompt_longer_than_context(tiny_llada_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"has 2250 tokens; with gen_length=32 it needs 2282 > the model context of 1024 tokens"):
        evaluate(tiny_llada_dir, tmp_path, "limit=1", "dataset.num_fewshot=4", f"dataset.fewshot_path={GSM8K_PATH}")


def test_resume_after_kill_loses_and_duplicates_nothing(tiny_llada_dir, tmp_path):
    reference = tmp_path / "reference"
    evaluate(tiny_llada_dir, reference, "limit=10", "generation.gen_length=64")
    crashed = tmp_path / "crashed"
    args = overrides(tiny_llada_dir, crashed, "limit=10", "generation.gen_length=64")
    process = subprocess.Popen([sys.executable, str(REPO / "eval.py"), *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = crashed / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (samples.is_file() and samples.read_text().count("\n") >= 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = samples.read_text().count("\n")
    assert 3 <= finished_before < 10, "the run should have been killed part-way"
    assert (crashed / ".lock").is_file(), "a killed run leaves its lock file; resume must take it over"
    # A crash can also cut the last line short: resume must drop it, not keep or duplicate it.
    with samples.open("a") as f:
        f.write('{"id": "gsm8k-test-9", "prom')

    with pytest.raises(ConfigError, match="pass resume=true"):
        evaluate(tiny_llada_dir, crashed, "limit=10", "generation.gen_length=64")
    with pytest.raises(ConfigError, match=r"settings differ .*\(generation.threshold: None -> 0.5\)"):
        evaluate(tiny_llada_dir, crashed, "limit=10", "generation.gen_length=64", "generation.threshold=0.5", "resume=true")
    results = evaluate(tiny_llada_dir, crashed, "limit=10", "generation.gen_length=64", "resume=true")

    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(by_id(reference)), "every sample exactly once"
    expected = by_id(reference)
    for record in lines:
        assert record["output"] == expected[record["id"]]["output"]
        assert record["nfe"] == expected[record["id"]]["nfe"]
    assert results["samples"] == 10


def test_two_processes_equal_one(tiny_llada_dir, tmp_path):
    single = tmp_path / "single"
    evaluate(tiny_llada_dir, single, "limit=5", "generation.threshold=0.8")
    double = tmp_path / "double"
    env_launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517")
    result = cli(*overrides(tiny_llada_dir, double, "limit=5", "generation.threshold=0.8", "batch_size=2"),
                 launcher=env_launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = by_id(single), by_id(double)
    assert sorted(one) == sorted(two)
    written = [json.loads(line)["id"] for line in (double / "samples.jsonl").read_text().splitlines()]
    assert written == [f"gsm8k-test-{i}" for i in range(5)], "dataset order, whichever process decoded a sample"
    assert {r["process"] for r in two.values()} == {0, 1}
    for sample_id, record in one.items():
        assert two[sample_id]["output"] == record["output"]
        assert two[sample_id]["nfe"] == record["nfe"]
    assert json.loads((double / "results.json").read_text())["processes"] == 2


def test_wandb_logger_writes_an_offline_run(tiny_llada_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "wandb-run"
    results = evaluate(tiny_llada_dir, out, "limit=2", "logger=wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    tables = runs[0] / "files" / "media" / "table"
    samples = json.loads(next(tables.glob("samples_*.table.json")).read_text())
    assert sorted(row[samples["columns"].index("id")] for row in samples["data"]) == ["gsm8k-test-0", "gsm8k-test-1"]
    summary = json.loads(next(tables.glob("results_*.table.json")).read_text())
    assert summary["data"][0][summary["columns"].index("nfe_mean")] == results["nfe_mean"]
