"""Retrieval on a generated Karpathy-style test JSON and STS on generated TSV files, each checked
against an independent numpy / scipy computation with the same tiny model."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import paddle
import pytest
import scipy.stats

import paddlemix.eval.retrieval as retrieval
import paddlemix.eval.sts as sts
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.data.transforms import image_transform
from paddlemix.eval.datasets import RetrievalDataset, read_sts_tsv
from paddlemix.eval.runner import main as eval_main

FIXTURES = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("eval_synthetic", FIXTURES / "eval" / "synthetic.py")
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, model_dir = synthetic.tiny_clip(tmp_path_factory.mktemp("tiny"), seed=4321)
    return model, model_dir, SimpleTokenizer(context_length=model.context_length)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    return synthetic.write_retrieval_json(tmp_path_factory.mktemp("coco"), n_images=14)


def _reference_retrieval(model, tok, ds):
    tf = image_transform(32, is_train=False, output="paddle")
    raw = RetrievalDataset(ds.annotation_file)  # PIL images, transformed here
    with paddle.no_grad():
        img = np.concatenate([model.encode_image(tf(raw[i][0]).unsqueeze(0)).numpy() for i in range(len(raw))])
        txt = model.encode_text(paddle.to_tensor(tok.batch_encode(ds.texts))).numpy()
    return _unit(img), _unit(txt)


def test_retrieval_matches_numpy(tiny, karpathy):
    model, _, tok = tiny
    ds = RetrievalDataset(karpathy, transform=image_transform(32, is_train=False, output="numpy"))
    m = retrieval.evaluate_retrieval(model, tok, ds, batch_size=4, num_workers=2, progress=False)
    img, txt = _reference_retrieval(model, tok, ds)
    sim = txt @ img.T  # [42 captions, 14 images]
    t2i = ds.text_to_image
    for k in (1, 5, 10):
        top_i = np.argsort(-sim, axis=1)[:, :k]
        top_t = np.argsort(-sim.T, axis=1)[:, :k]
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx((top_i == t2i[:, None]).any(1).mean(), abs=1e-12)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx((t2i[top_t] == np.arange(14)[:, None]).any(1).mean(),
                                                              abs=1e-12)
    assert m["num_images"] == 14 and m["num_texts"] == 42
    assert m["image_retrieval_recall@10"] < 1.0 or m["image_retrieval_recall@1"] < 1.0  # not trivially saturated


def test_retrieval_sharded_equals_single(tiny, karpathy, monkeypatch):
    """World of 3 simulated in-process: each rank encodes its share, one gather restores the order."""
    model, _, tok = tiny
    ds = RetrievalDataset(karpathy, transform=image_transform(32, is_train=False, output="numpy"))
    single = retrieval.retrieval_features(model, tok, ds, batch_size=8, progress=False)
    captured = {}

    class Stop(Exception):
        pass

    for rank in (1, 2, 0):
        monkeypatch.setattr(retrieval, "world_info", lambda distributed=None, r=rank: (r, 3))

        def gather(obj, world, r=rank):
            if r:
                captured[r] = obj
                raise Stop
            return [obj, captured[1], captured[2]]

        monkeypatch.setattr(retrieval, "all_gather", gather)
        try:
            merged = retrieval.retrieval_features(model, tok, ds, batch_size=8, progress=False)
        except Stop:
            continue
    assert captured[1]["img"][0].tolist() == [1, 4, 7, 10, 13] and len(captured[2]["txt"][0]) == 14
    np.testing.assert_allclose(merged["image_features"], single["image_features"], atol=1e-6)
    np.testing.assert_allclose(merged["text_features"], single["text_features"], atol=1e-6)


def test_sts_matches_scipy(tiny, tmp_path):
    model, _, tok = tiny
    files = [synthetic.write_sts_tsv(tmp_path / "sts-a.tsv", header=False),
             synthetic.write_sts_tsv(tmp_path / "sts-b.tsv", header=True)]
    # Make the second set differ so the mean is a mean of two different numbers.
    lines = files[1].read_text().splitlines()
    files[1].write_text("\n".join(lines[:1] + [l.rsplit("\t", 1)[0] + f"\t{i % 3}" for i, l in enumerate(lines[1:])]) + "\n")
    res = sts.evaluate_sts(model, tok, files, batch_size=3, progress=False)
    expected = []
    for f in files:
        pairs = read_sts_tsv(f)
        with paddle.no_grad():
            a = _unit(model.encode_text(paddle.to_tensor(tok.batch_encode(pairs.sentences1))).numpy())
            b = _unit(model.encode_text(paddle.to_tensor(tok.batch_encode(pairs.sentences2))).numpy())
        cos = (a * b).sum(1)
        rho = scipy.stats.spearmanr(cos, pairs.scores).statistic
        assert res[pairs.name]["spearman"] == pytest.approx(rho, abs=1e-9)
        assert res[pairs.name]["pearson"] == pytest.approx(scipy.stats.pearsonr(cos, pairs.scores).statistic, abs=1e-5)
        assert res[pairs.name]["num_pairs"] == 8
        expected.append(rho)
    assert res["mean_spearman"] == pytest.approx(np.mean(expected), abs=1e-9)
    assert expected[0] != pytest.approx(expected[1])
    with pytest.raises(ValueError, match="two STS sets are named"):
        sts.evaluate_sts(model, tok, [files[0], files[0]], progress=False)


def test_cli_retrieval_and_sts(tiny, karpathy, tmp_path):
    model, model_dir, tok = tiny
    sts_file = synthetic.write_sts_tsv(tmp_path / "stsb.tsv", header=True)
    out = tmp_path / "out"
    assert eval_main(["--model", str(model_dir), "--retrieval_eval", str(karpathy), "--sts_eval", str(sts_file),
                      "--output_dir", str(out), "--dataloader_num_workers", "0", "--disable_tqdm", "--no_report"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([  # --no_report: the JSON results only
        f"karpathy_test_none_{model_dir.name}_en_zeroshot_retrieval.json", f"sts_none_{model_dir.name}_en_sts.json",
        "results.jsonl"])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["task"]) for r in records] == [("karpathy_test", "zeroshot_retrieval"), ("sts", "sts")]
    ds = RetrievalDataset(karpathy, transform=image_transform(32, is_train=False, output="numpy"))
    direct = retrieval.evaluate_retrieval(model, tok, ds, progress=False)
    assert records[0]["metrics"] == pytest.approx(direct)
    assert set(records[1]["metrics"]) == {"stsb", "mean_spearman"}
    with pytest.raises(SystemExit):
        eval_main(["--model", str(model_dir)])  # nothing to evaluate is a usage error
