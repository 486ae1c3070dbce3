"""The line protocol between ``run_all.py`` and its benchmark workers (standard library only).

A worker is a long-lived process that owns one framework (Paddle, or torch for the peer) and
answers one JSON request per line on stdin with one JSON reply per line:

    {"op": "setup", "case": {...}}  -> {"ok": true, "info": {...}}   build what the case times
    {"op": "run"}                   -> {"ok": true, "seconds": s}     time one unit of work
                                                                       (after an untimed prepare())
    {"op": "exit"}                  -> the worker exits

Both frameworks stay loaded while the coordinator alternates between them, so each side is
timed under the same machine load. Anything the libraries print goes to stderr: the
protocol owns the original stdout.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, Optional

logger = logging.getLogger("bench.worker")

Setup = Callable[[Dict[str, Any]], "Case"]


class Case:
    """What a worker holds for one benchmark row: ``run()`` does the timed work once."""

    info: Dict[str, Any] = {}

    def prepare(self) -> None:
        """Untimed set-up before each ``run()`` (e.g. a fresh tokenizer for a cold cache)."""
        return None

    def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        return None


def serve(setups: Dict[str, Setup]) -> None:
    """Answer requests until ``exit``; ``setups`` maps a case ``kind`` to its builder."""
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt replies
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    current: Optional[Case] = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "exit":
                break
            if op == "setup":
                if current is not None:
                    current.close()
                    current = None
                kind = request["case"]["kind"]
                if kind not in setups:
                    reply = {"ok": False, "error": f"this worker has no benchmark of kind {kind!r}"}
                else:
                    current = setups[kind](request["case"])
                    reply = {"ok": True, "info": dict(current.info)}
            elif op == "run":
                if current is None:
                    raise RuntimeError("run before setup")
                current.prepare()
                start = time.perf_counter()
                current.run()
                reply = {"ok": True, "seconds": time.perf_counter() - start}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which decides
            logger.error("%s failed:\n%s", op, traceback.format_exc())
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")
    if current is not None:
        current.close()
