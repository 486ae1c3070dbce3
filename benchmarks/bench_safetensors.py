"""safetensors reading and writing: paddlemix's own code next to the ``safetensors`` library's numpy API.

    python benchmarks/bench_safetensors.py [--mib 256] [--repeats 3] [--json benchmarks/results_safetensors_cpu_2core.json]

Why this exists: ``paddlemix/zoo/formats/safetensors.py`` reads and writes safetensors by hand
(behind its header validation) although the library is installed; this measures what the
library's numpy API would cost in the way the loader uses a file. A file of ``--mib`` MiB
(float32 tensors of 4 MiB each) is written once; every case then runs in a fresh process that
imports both libraries first (so imports count in neither time nor memory):

* ``read paddlemix``: views of the mapped file, each copied into a model-sized buffer and
  released (what :mod:`paddlemix.zoo.loading` does);
* ``read library mmap`` / ``read library pread``: ``safe_open(framework="numpy", backend=...)``,
  ``get_tensor`` per name, copied into the same buffer and dropped;
* ``write paddlemix``: ``save_safetensors`` of lazily computed tensors (a conversion's output);
* ``write library``: ``safetensors.numpy.save_file``, which needs every tensor in memory.

Reported: wall time of the case and the growth of peak RSS (``ru_maxrss``) over the process's
peak after the imports, the median over ``--repeats`` runs with the file in the page cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

SHAPE = (1024, 1024)  # 4 MiB of float32
CASES = ("read paddlemix", "read library mmap", "read library pread", "write paddlemix", "write library")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(case: str, path: str, count: int) -> Dict[str, float]:
    """One case in this (fresh) process: its wall time and peak RSS growth."""
    import numpy as np
    import safetensors.numpy as st_numpy
    from safetensors import safe_open

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's paddlemix
    from paddlemix.zoo.formats.lazy import LazyArray, release
    from paddlemix.zoo.formats.safetensors import load_safetensors, save_safetensors

    names = [f"t{i:04d}" for i in range(count)]
    out = np.empty(SHAPE, np.float32)
    base = _peak_mib()
    start = time.perf_counter()
    if case == "read paddlemix":
        for view in load_safetensors(path).values():
            np.copyto(out, view)
            release(view)
    elif case.startswith("read library"):
        with safe_open(path, framework="numpy", backend=case.rsplit(" ", 1)[-1]) as f:
            for name in f.keys():
                np.copyto(out, f.get_tensor(name))
    elif case == "write paddlemix":
        seed = np.ones(1, np.float32)
        save_safetensors({n: LazyArray(lambda s: np.full(SHAPE, s[0], np.float32), seed, shape=SHAPE,
                                       dtype=np.float32) for n in names}, path)
    elif case == "write library":
        st_numpy.save_file({n: np.full(SHAPE, 1.0, np.float32) for n in names}, path)
    else:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    return {"seconds": time.perf_counter() - start, "peak_growth_mib": _peak_mib() - base}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="file size in MiB (a multiple of 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("CASE", "PATH", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, path, count = args.child
        print(json.dumps(_child(case, path, int(count))))
        return 0

    import numpy as np
    import safetensors.numpy as st_numpy

    count = max(1, args.mib // 4)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_safetensors.") as tmp:
        source = Path(tmp) / "source.safetensors"
        rng = np.random.default_rng(0)
        st_numpy.save_file({f"t{i:04d}": rng.standard_normal(SHAPE, dtype=np.float32) for i in range(count)},
                           str(source))
        source.read_bytes()  # into the page cache
        for case in CASES:
            path = source if case.startswith("read") else Path(tmp) / "written.safetensors"
            runs = []
            for _ in range(args.repeats):
                proc = subprocess.run([sys.executable, __file__, "--child", case, str(path), str(count)],
                                      capture_output=True, text=True, check=True)
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows.append({"case": case, "runs": runs,
                         "seconds": statistics.median(r["seconds"] for r in runs),
                         "peak_growth_mib": statistics.median(r["peak_growth_mib"] for r in runs)})
    table = [f"{args.mib} MiB file, {count} float32 tensors of 4 MiB; median of {args.repeats} runs",
             f"{'case':<20} {'seconds':>8} {'peak RSS growth (MiB)':>22}"]
    table += [f"{r['case']:<20} {r['seconds']:>8.3f} {r['peak_growth_mib']:>22.0f}" for r in rows]
    print("\n".join(table))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0],
                                         "file_mib": args.mib, "rows": rows, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
