"""Results as CLIP_benchmark-style JSON records and as a table people can read in a log."""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .common import atomic_write

__all__ = [
    "format_table",
    "make_record",
    "read_records",
    "record_filename",
    "write_evaluation_files",
    "write_results",
]

# The keys CLIP_benchmark's ``eval`` writes and its ``build`` reads.
RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def make_record(dataset: str, task: str, metrics: Dict[str, Any], model: str, pretrained: Optional[str],
                language: str = "en") -> Dict[str, Any]:
    """One result in CLIP_benchmark's schema: ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained or "", "task": task, "metrics": metrics,
            "language": language}


def _slug(text: str) -> str:
    # CLIP_benchmark names its files from slugs of the model, checkpoint and dataset; a path keeps its basename.
    text = os.path.basename(str(text).rstrip("/\\")) or str(text)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "none"


def record_filename(record: Dict[str, Any]) -> str:
    """CLIP_benchmark's default output name, ``{dataset}_{pretrained}_{model}_{language}_{task}.json``."""
    parts = (record["dataset"], record.get("pretrained") or "none", record["model"], record.get("language", "en"),
             record["task"])
    return "_".join(_slug(p) for p in parts) + ".json"


def write_evaluation_files(records: Sequence[Dict[str, Any]], output_dir: Union[str, os.PathLike]) -> List[Path]:
    """One CLIP_benchmark-style JSON per evaluation, plus ``results.jsonl`` with all of them.

    ``clip_benchmark build OUTPUT_DIR/*.json`` merges the per-evaluation files into one CSV (one
    row each); the combined file is JSON lines so that glob does not pick it up.
    """
    output_dir = Path(output_dir)
    paths = []
    for rec in records:
        text = json.dumps(_json_safe(rec), indent=2, allow_nan=False) + "\n"
        paths.append(atomic_write(output_dir / record_filename(rec), lambda f, t=text: f.write(t.encode("utf-8"))))
    lines = "".join(json.dumps(_json_safe(rec), allow_nan=False) + "\n" for rec in records)
    paths.append(atomic_write(output_dir / "results.jsonl", lambda f: f.write(lines.encode("utf-8"))))
    return paths


def read_records(output_dir: Union[str, os.PathLike]) -> List[Dict[str, Any]]:
    """The per-evaluation records in a folder (its ``*.json`` files in CLIP_benchmark's shape), by file name."""
    records = []
    for path in sorted(Path(output_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(k in data for k in ("dataset", "task", "metrics")):
            records.append(data)
    return records


def _json_safe(value: Any) -> Any:
    # NaN / inf are not JSON; a missing metric (e.g. acc5 with < 5 classes) is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(records: Sequence[Dict[str, Any]], output_dir: Union[str, os.PathLike], filename: str = "results.json") -> Path:
    """Write the records as one JSON list, atomically (a crash never leaves half a file)."""
    text = json.dumps(_json_safe(list(records)), indent=2, allow_nan=False) + "\n"
    return atomic_write(Path(output_dir) / filename, lambda f: f.write(text.encode("utf-8")))


def _flatten(metrics: Dict[str, Any], prefix: str = "") -> List[tuple]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, name + "/")
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Accuracies, recalls and correlations are fractions; print them as percentages.
        return f"{100.0 * value:.2f}"
    return str(value)


def format_table(records: Sequence[Dict[str, Any]]) -> str:
    """Fixed-width table: dataset, task, metric, value (fractions shown x100)."""
    rows = [("dataset", "task", "metric", "value")]
    for rec in records:
        for name, value in _flatten(rec["metrics"]):
            rows.append((rec["dataset"], rec["task"], name, _cell(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
