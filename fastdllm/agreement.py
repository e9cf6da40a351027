"""Token agreement of finished eval.py runs with reference runs:
`python -m fastdllm.agreement runs=[DIR,...] reference=[DIR,...]`.

    python -m fastdllm.agreement runs=[outputs/layer-sweep] reference=[outputs/no-reuse]

Each run is compared with the reference run of the same configuration apart from the `reuse` group
(and the keys that never change outputs: batch size, output directory, ...), sample by sample: the
share of answer token positions that hold the same token (over the longer of the two answers), and
the share of samples whose answers are identical. Directories are runs or multiruns (as for
fastdllm.plot); the numbers are added to each run's results.json under `agreement`, so that
fastdllm.plot can draw them (y=[agreement.tokens]), and printed as a table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fastdllm.rundir import CONFIG_FILE, RESULTS_FILE, RESUMABLE_KEYS, SAMPLES_FILE, read_samples
from fastdllm.plot import markdown_table
from fastdllm.registry import ConfigError, check

# Keys of config.yaml that may differ between a run and its reference.
IGNORED_KEYS = RESUMABLE_KEYS | {"reuse"}


@dataclass
class AgreementConfig:
    runs: list[str] = MISSING
    reference: list[str] = MISSING

    def __post_init__(self) -> None:
        check(len(self.runs) >= 1, "runs", self.runs, "name at least one run or multirun directory")
        check(len(self.reference) >= 1, "reference", self.reference, "name at least one run or multirun directory")


ConfigStore.instance().store(name="agreement_schema", node=AgreementConfig)


def run_directories(directories: list[str]) -> list[Path]:
    """Run directories (holding results.json) in `directories`, each a run or a multirun above runs."""
    found = []
    for directory in map(Path, directories):
        runs = [directory] if (directory / RESULTS_FILE).is_file() else sorted(p.parent for p in directory.glob(f"*/{RESULTS_FILE}"))
        if not runs:
            raise ConfigError(f"{directory} holds no {RESULTS_FILE}, nor do its subdirectories")
        found += runs
    return found


def compared_settings(run: Path) -> str:
    config = OmegaConf.to_container(OmegaConf.load(run / CONFIG_FILE))
    return json.dumps({k: v for k, v in config.items() if k not in IGNORED_KEYS}, sort_keys=True)


def token_agreement(records: list[dict[str, Any]], reference: list[dict[str, Any]], tokenizer) -> dict[str, float]:
    """Mean share of equal answer tokens (over the longer answer) and share of identical answers."""
    outputs = {r["id"]: r["output"] for r in reference}
    missing = [r["id"] for r in records if r["id"] not in outputs]
    if missing:
        raise ConfigError(f"the reference run lacks samples {missing[:3]}...: evaluate it on the same rows")
    shares, identical = [], 0
    for record in records:
        ours = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        theirs = tokenizer(outputs[record["id"]], add_special_tokens=False)["input_ids"]
        longer = max(len(ours), len(theirs))
        shares.append(1.0 if longer == 0 else sum(a == b for a, b in zip(ours, theirs)) / longer)
        identical += record["output"] == outputs[record["id"]]
    return {"tokens": sum(shares) / len(shares), "identical": identical / len(records)}


def agreement(cfg: AgreementConfig) -> list[list[Any]]:
    from fastdllm.models import load_tokenizer, resolve_checkpoint

    references = {compared_settings(run): run for run in run_directories(cfg.reference)}
    rows, tokenizers = [], {}
    for run in run_directories(cfg.runs):
        reference = references.get(compared_settings(run))
        if reference is None:
            raise ConfigError(f"no reference run has the settings of {run} (apart from reuse): add one to `reference`")
        results = json.loads((run / RESULTS_FILE).read_text())
        path = results["model_path"]
        if path not in tokenizers:
            tokenizers[path] = load_tokenizer(resolve_checkpoint(path, None))
        measured = token_agreement(read_samples(run / SAMPLES_FILE), read_samples(reference / SAMPLES_FILE), tokenizers[path])
        results["agreement"] = measured | {"reference": str(reference)}
        (run / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        rows.append([str(run), str(reference), measured["tokens"], measured["identical"]])
    return rows


@hydra.main(config_path="../conf", config_name="agreement", version_base="1.3")
def main(cfg: DictConfig) -> None:
    rows = agreement(OmegaConf.to_object(cfg))
    print(markdown_table(rows, ["run", "reference", "agreement.tokens", "agreement.identical"]), end="")


if __name__ == "__main__":
    main()
