"""``python -m paddlemix.report OUTPUT_DIR``: redraw the plots and pages of a run from its saved files.

Works on a training output folder (``train_log.jsonl`` -> ``train_curves.png``) and on an
evaluation output folder (per-evaluation JSON files and saved predictions -> ``report.html``,
``retrieval.html`` and their plots). No model and no dataset are needed.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from .eval.pages import render_reports

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paddlemix.report", description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR",
                        help="a folder written by run_pretrain_dist.py or run_zero_shot_eval.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    status = 0
    for folder in map(Path, args.output_dirs):
        if not folder.is_dir():
            logging.getLogger("paddlemix.report").error("%s is not a folder", folder)
            status = 2
            continue
        written = render_reports(folder)
        if not written:
            logging.getLogger("paddlemix.report").error(
                "%s holds no train_log.jsonl and no evaluation results (*.json in CLIP_benchmark's shape)", folder)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
