"""``python -m paddlemix.kernels build|status``: build the kernel library ahead of time, or say what loads."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from . import build, status

logger = logging.getLogger("paddlemix.kernels")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paddlemix.kernels", description=__doc__)
    parser.add_argument("action", choices=("build", "status"))
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "build":
        logger.info("paddlemix kernels built: %s", build(verbose=args.verbose))
    current = status()
    logger.info("paddlemix kernels: %s (%s)", "available" if current.available else "unavailable", current.detail)
    return 0 if current.available else 1


if __name__ == "__main__":
    sys.exit(main())
