"""Metric functions on hand-made logits and labels with known answers, and against sklearn / scipy.

Tie rule under test (paddlemix.eval.metrics): rank = number of other candidates scoring >= the
target; a hit at k needs rank < k, so ties count against the model; NaN rows never count.
"""
import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import balanced_accuracy_score

from paddlemix.eval.metrics import (
    classification_metrics,
    mean_per_class_recall,
    pearson,
    rankdata,
    recall_at_k,
    retrieval_metrics,
    spearman,
    top_k_accuracy,
    topk_correct,
)

NAN = float("nan")

# 6 classes; one row per situation.
LOGITS = np.array(
    [
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: clear winner
        [0.5, 0.5, 0.1, 0.1, 0.1, 0.1],  # label 0: tied for first -> top-1 miss, top-5 hit (rank 1)
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 0: last (rank 5) -> top-5 miss
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 1: rank 4 -> top-5 hit
        [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # label 2: all equal -> rank 5, misses below k=6
        [NAN, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 1: NaN row -> miss at every k
    ],
    dtype=np.float32,
)
LABELS = np.array([0, 0, 0, 1, 2, 1])


def test_topk_hits_with_ties_and_nan():
    hits = topk_correct(LOGITS, LABELS, ks=(1, 2, 5, 6))
    assert hits[1].tolist() == [True, False, False, False, False, False]
    assert hits[2].tolist() == [True, True, False, False, False, False]
    assert hits[5].tolist() == [True, True, False, True, False, False]
    assert hits[6].tolist() == [True, True, True, True, True, False]


def test_accuracies_and_mean_per_class_recall_known_answers():
    assert top_k_accuracy(LOGITS, LABELS, 1) == pytest.approx(1 / 6)
    assert top_k_accuracy(LOGITS, LABELS, 5) == pytest.approx(3 / 6)
    # class 0: 1 of 3 rows right, class 1: 0 of 2, class 2: 0 of 1; classes 3-5 never occur.
    assert mean_per_class_recall(LOGITS, LABELS) == pytest.approx((1 / 3 + 0 + 0) / 3)
    m = classification_metrics(LOGITS, LABELS)
    assert m == {"acc1": pytest.approx(1 / 6), "acc5": pytest.approx(0.5), "mean_per_class_recall": pytest.approx(1 / 9)}


def test_a_collapsed_model_scores_zero():
    """Constant logits (e.g. fp16 overflow) must not earn accuracy by sort order."""
    logits = np.zeros((10, 7), np.float32)
    labels = np.arange(10) % 7
    m = classification_metrics(logits, labels)
    assert m["acc1"] == 0.0 and m["acc5"] == 0.0 and m["mean_per_class_recall"] == 0.0


def test_fewer_than_five_classes():
    logits = np.array([[0.2, 0.9, 0.1], [0.8, 0.1, 0.3], [0.1, 0.2, 0.7], [0.4, 0.4, 0.1]], np.float32)
    labels = np.array([1, 2, 2, 0])
    m = classification_metrics(logits, labels)
    # CLIP_benchmark reports top-5 as missing (NaN) below 5 classes; here None (valid JSON).
    assert m["acc5"] is None
    assert m["acc1"] == pytest.approx(2 / 4)  # rows 0 and 2; row 3 is a tie
    assert m["mean_per_class_recall"] == pytest.approx((0 + 1 + 0.5) / 3)
    # By definition every label is within the top k when k >= number of classes.
    assert top_k_accuracy(logits, labels, 5) == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sorting_and_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((500, 37)).astype(np.float32)
    labels = rng.integers(0, 37, 500)
    order = np.argsort(-logits, axis=1)
    for k in (1, 5, 10):
        expected = (order[:, :k] == labels[:, None]).any(axis=1).mean()
        assert top_k_accuracy(logits, labels, k) == pytest.approx(expected, abs=0)
    assert mean_per_class_recall(logits, labels) == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(1)), abs=1e-12
    )


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 6\)"):
        topk_correct(LOGITS, np.array([0, 0, 0, 1, 2, 6]))
    with pytest.raises(ValueError, match="must have shape"):
        topk_correct(LOGITS, LABELS[:3])
    with pytest.raises(ValueError, match="positive integer"):
        topk_correct(LOGITS, LABELS, ks=(0,))
    with pytest.raises(ValueError, match="integer class indices"):
        topk_correct(LOGITS, LABELS.astype(np.float32))


def test_recall_at_k_with_several_positives():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # positives 3, 5: best positive has 3 negatives above
            [0.5, 0.5, 0.5, 0.1, 0.1, 0.1],  # positives 0, 1 tie with negative 2 -> that tie counts
            [0.1, 0.9, 0.9, 0.3, 0.2, 0.0],  # positives 1, 2 tie with each other at the top: found at 1
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # positive 0 is last
        ],
        np.float32,
    )
    pos = np.zeros_like(scores, dtype=bool)
    for q, ps in enumerate([(3, 5), (0, 1), (1, 2), (0,)]):
        pos[q, list(ps)] = True
    found = recall_at_k(scores, pos, ks=(1, 2, 3, 4, 5, 6))
    assert found[1].tolist() == [False, False, True, False]
    assert found[2].tolist() == [False, True, True, False]
    assert found[3].tolist() == [False, True, True, False]
    assert found[4].tolist() == [True, True, True, False]
    assert found[5].tolist() == [True, True, True, False]
    assert found[6].tolist() == [True, True, True, True]
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k(scores, np.zeros_like(pos), ks=(1,))


def test_retrieval_metrics_field_names_and_directions():
    """3 images, 5 captions; caption t describes image t2i[t]. Features chosen so each answer is known."""
    images = np.eye(3, dtype=np.float32)
    t2i = np.array([0, 0, 1, 2, 2])
    texts = np.array(
        [
            [1.0, 0.0, 0.0],  # image 0: rank 0
            [0.0, 1.0, 0.2],  # image 0, but closest to image 1 then 2: rank 2
            [0.0, 1.0, 0.0],  # image 1: rank 0
            [0.9, 0.0, 0.1],  # image 2: rank 1
            [0.2, 0.0, 1.0],  # image 2: rank 0
        ],
        np.float32,
    )
    m = retrieval_metrics(images, texts * 3.0, t2i, ks=(1, 2, 5))  # scale must not matter (cosine)
    assert set(m) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 5)}
    # text -> image: found at 1 for captions 0, 2, 4; at 2 also caption 3.
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@5"] == 1.0
    # image -> text: each image's best caption is its most similar caption overall (image 0: caption 0
    # at cosine 1 beats caption 3 at 0.994; image 1: caption 2 at 1 beats caption 1 at 0.98; image 2:
    # caption 4 at 0.98 beats caption 1 at 0.196), even though caption 1 is a poor match for image 0.
    assert m["text_retrieval_recall@1"] == 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_a_sorting_implementation(seed):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((40, 8)).astype(np.float32)
    t2i = np.repeat(np.arange(40), 3)
    texts = images[t2i] + 1.5 * rng.standard_normal((120, 8)).astype(np.float32)
    m = retrieval_metrics(images, texts, t2i)
    ni = images / np.linalg.norm(images, axis=1, keepdims=True)
    nt = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sim = nt @ ni.T
    for k in (1, 5, 10):
        t2i_top = np.argsort(-sim, axis=1)[:, :k]
        expect_img = (t2i_top == t2i[:, None]).any(1).mean()
        i2t_top = np.argsort(-sim.T, axis=1)[:, :k]
        expect_txt = (t2i[i2t_top] == np.arange(40)[:, None]).any(1).mean()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(expect_img, abs=0)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(expect_txt, abs=0)
    assert 0 < m["image_retrieval_recall@1"] < m["image_retrieval_recall@10"] < 1


def test_rankdata_and_spearman_with_ties_match_scipy():
    x = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], np.float64)
    y = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4], np.float64)
    np.testing.assert_array_equal(rankdata(x), scipy.stats.rankdata(x))
    assert rankdata([2.0, 2.0, 2.0]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([10.0, 20.0, 20.0, 30.0]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))
    with pytest.raises(ValueError, match="NaN"):
        rankdata([1.0, NAN])


def test_block_processing_does_not_change_results(monkeypatch):
    """Large sets are processed in row blocks; tiny blocks (1-3 rows) give identical answers."""
    import paddlemix.eval.metrics as metrics

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((50, 9)).astype(np.float32)
    logits[::7, 3] = logits[::7, 4]  # some ties
    labels = rng.integers(0, 9, 50)
    images = rng.standard_normal((11, 4)).astype(np.float32)
    t2i = np.repeat(np.arange(11), 2)
    texts = images[t2i] + rng.standard_normal((22, 4)).astype(np.float32)
    whole = (topk_correct(logits, labels, ks=(1, 3)), retrieval_metrics(images, texts, t2i))
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 25)
    blocked = (topk_correct(logits, labels, ks=(1, 3)), retrieval_metrics(images, texts, t2i))
    for k in (1, 3):
        np.testing.assert_array_equal(whole[0][k], blocked[0][k])
    assert whole[1] == blocked[1]
