"""Text-encoder semantic textual similarity: Spearman correlation of cosine similarity with gold scores.

This is the sentence-embedding protocol (SentEval / MTEB) used to report text towers, e.g. the
average over six STS sets: both sentences go through ``encode_text`` alone (no prompt), the score
of a pair is the cosine of their embeddings, and the result is Spearman's rho against the gold
scores (ties get average ranks). Values are correlations in [-1, 1]; papers usually print x100.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from .common import all_gather, encode_texts, merge_shards, shard_indices, world_info
from .datasets import StsPairs, read_sts_tsv
from .metrics import pearson, spearman

logger = logging.getLogger(__name__)

__all__ = ["evaluate_sts", "sts_cosine_scores"]


def sts_cosine_scores(
    model,
    tokenizer,
    pairs: StsPairs,
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> np.ndarray:
    """Cosine similarity of every pair, in file order (gathers once when distributed)."""
    rank, world = world_info(distributed)
    n = len(pairs.scores)
    mine = shard_indices(n, rank, world)
    texts = [pairs.sentences1[i] for i in mine] + [pairs.sentences2[i] for i in mine]
    emb = encode_texts(model, tokenizer, texts, batch_size=batch_size, precision=precision, normalize=True,
                       progress=progress and rank == 0, desc=pairs.name)
    cos = (emb[: len(mine)] * emb[len(mine):]).sum(axis=1) if len(mine) else np.zeros(0, np.float32)
    return merge_shards(all_gather((mine, cos), world), n)


def evaluate_sts(
    model,
    tokenizer,
    files: Sequence[Union[str, os.PathLike, StsPairs]],
    *,
    batch_size: int = 64,
    precision: str = "fp32",
    distributed: Optional[bool] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Per file ``{"spearman", "pearson", "num_pairs"}`` keyed by file stem, plus ``mean_spearman``."""
    if not files:
        raise ValueError("no STS files given")
    results: Dict[str, Any] = {}
    for item in files:
        pairs = item if isinstance(item, StsPairs) else read_sts_tsv(item)
        if pairs.name in results:
            raise ValueError(f"two STS sets are named {pairs.name!r}; rename one file so results stay distinct")
        cos = sts_cosine_scores(model, tokenizer, pairs, batch_size=batch_size, precision=precision,
                                distributed=distributed, progress=progress)
        results[pairs.name] = {
            "spearman": spearman(cos, pairs.scores),
            "pearson": pearson(cos, pairs.scores),
            "num_pairs": int(len(pairs.scores)),
        }
    results["mean_spearman"] = float(np.mean([r["spearman"] for r in results.values()]))
    return results
