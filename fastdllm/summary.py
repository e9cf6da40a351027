"""What a finished evaluation reports: results.json's metrics over its samples, and the table
printed at its end."""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from fastdllm.settings import Settings, gen_length_of


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    n = len(ordered)
    return ordered[min(n - 1, math.ceil(fraction * n) - 1)] if n else float("nan")


def summarize(records: list[dict[str, Any]], settings: Settings, world_size: int) -> dict[str, Any]:
    n = len(records)
    # A sample's share of its batch's decode time, less the batch's warm-up (graph capture, kernel
    # compilation: reported as warmup_seconds); summed, the total decode time of all processes.
    decode_seconds = sum((r["latency_s"] - r.get("warmup_s", 0.0)) / r["batch_size"] for r in records)
    latencies = sorted(r["latency_s"] for r in records)
    steps = sum(len(r["committed_per_step"]) for r in records)
    gen_length = gen_length_of(settings)
    return {
        "accuracy": sum(r["correct"] for r in records) / n if n else float("nan"),
        "samples": n,
        "nfe_mean": sum(r["nfe"] for r in records) / n if n else float("nan"),
        "positions_mean": sum(r["positions"] for r in records) / n if n else float("nan"),
        "layer_positions_mean": sum(r["layer_positions"] for r in records) / n if n else float("nan"),
        "tokens_mean": sum(r["tokens"] for r in records) / n if n else float("nan"),
        # Throughput per process: answer tokens (up to the end token), and all gen_length tokens.
        "tokens_per_s": sum(r["tokens"] for r in records) / decode_seconds if decode_seconds else float("nan"),
        "tokens_per_s_all": n * gen_length / decode_seconds if decode_seconds else float("nan"),
        "latency_mean_s": sum(latencies) / n if n else float("nan"),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        # Tokens committed per decoding step, over every step of every sample.
        "tokens_per_step_mean": sum(sum(r["committed_per_step"]) for r in records) / steps if steps else float("nan"),
        "decode_seconds": decode_seconds,
        "model": settings.model.name,
        "model_path": settings.model.path,
        "cache": asdict(settings.cache),
        "generation": asdict(settings.generation) | {"gen_length": gen_length},
        "reuse": asdict(settings.reuse),
        "dataset": settings.dataset.name,
        "batch_size": settings.run.batch_size,
        "dtype": settings.run.dtype,
        "processes": world_size,
    }


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gen = results["generation"]
    title = (
        f"{results['model']} | {results['dataset']} | cache={results['cache']['name']} | "
        f"generation={gen['name']} gen_length={gen['gen_length']} block={gen['block_length']} "
        f"threshold={gen.get('threshold')} | reuse={results['reuse']['name']}"
    )
    table = Table(title=title)
    rows = [
        ("samples", f"{results['samples']}"),
        ("accuracy", f"{100 * results['accuracy']:.2f} %"),
        ("NFE (mean forward passes)", f"{results['nfe_mean']:.1f}"),
        ("positions computed (mean)", f"{results['positions_mean']:.0f}"),
        ("layer-positions computed (mean)", f"{results['layer_positions_mean']:.0f}"),
        ("tokens/s (answer tokens up to EOS)", f"{results['tokens_per_s']:.1f}"),
        ("tokens/s (all gen_length tokens)", f"{results['tokens_per_s_all']:.1f}"),
        ("latency mean / p95 (s, per batch)", f"{results['latency_mean_s']:.3f} / {results['latency_p95_s']:.3f}"),
        ("engine", results.get("engine", "eager")),
        ("warm-up (s, graph capture, compilation)", f"{results.get('warmup_seconds', 0.0):.1f}"),
    ]
    rows += [("fell back", reason) for reason in results.get("engine_fallbacks", [])]
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
