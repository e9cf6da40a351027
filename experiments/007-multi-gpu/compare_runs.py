"""The runs of run_two_gpus.sh side by side: python3 experiments/007-multi-gpu/compare_runs.py OUT_DIR.
Per run: samples, distinct ids, outputs equal to the one-GPU run of the same cache and batch size,
tokens/s (all gen_length tokens) per process and summed over the processes, which decode concurrently,
and that sum against the one-GPU run. Throughput leaves out each process's first batch (unless it is
its only one), whose time includes compilation and graph capture (shorter for whichever run finds the
compiler's disk cache warm)."""
import json
import sys
from collections import defaultdict
from pathlib import Path

out = Path(sys.argv[1])


def load(run: Path):
    rows = [json.loads(line) for line in (run / "samples.jsonl").open()]
    results = json.loads((run / "results.json").read_text())
    return rows, results


def tokens_per_s_by_process(rows, gen_length, batch_size):
    """Per process, past its first batch (a process decodes its rows in dataset order, batch_size at a time)."""
    by_process = defaultdict(list)
    for row in rows:
        by_process[row["process"]].append(row)
    speeds = {}
    for process, own in sorted(by_process.items()):
        counted = own[batch_size:] or own  # a single batch: counted, compilation included
        seconds = sum(row["latency_s"] / row["batch_size"] for row in counted)  # a sample's share of its batch
        speeds[process] = len(counted) * gen_length / seconds if seconds else float("nan")
    return speeds


for one in sorted(out.glob("one_*")):
    if not (one / "results.json").exists():
        continue
    reference_rows, reference = load(one)
    outputs = {row["id"]: row["output"] for row in reference_rows}
    gen_length = reference["generation"]["gen_length"]
    batch_size = reference["batch_size"]
    [single] = tokens_per_s_by_process(reference_rows, gen_length, batch_size).values()
    print(f"{one.name}: {len(reference_rows)} samples, {len(outputs)} distinct ids, tokens/s {single:.1f} "
          f"({reference['tokens_per_s_all']:.1f} with the first batch)")
    setting = one.name.removeprefix("one_")
    for two in sorted(path for path in out.glob(f"two_{setting}*") if path.is_dir()):
        if not (two / "results.json").exists():
            print(f"  {two.name}: no results.json")
            continue
        rows, results = load(two)
        ids = [row["id"] for row in rows]
        same = sum(outputs.get(row["id"]) == row["output"] for row in rows)
        per_process = tokens_per_s_by_process(rows, gen_length, batch_size)
        total = sum(per_process.values())
        print(f"  {two.name}: {len(rows)} samples, {len(set(ids))} distinct ids, outputs equal to one GPU "
              f"{same}/{len(outputs)}, tokens/s per process "
              + " / ".join(f"{v:.1f}" for v in per_process.values())
              + f", summed {total:.1f} ({total / single:.2f}x one GPU)")
