"""Pictures and pages of a run: VisualDL scalars, train_curves.png, report.html, retrieval.html,
CLIP_benchmark per-evaluation files, and ``python -m paddlemix.report`` redrawing them from saved outputs.
"""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddlemix.eval import pages, plots
from paddlemix.eval.metrics import retrieval_metrics
from paddlemix.eval.report import make_record, read_records, record_filename, write_evaluation_files
from paddlemix.eval.retrieval import retrieval_rankings

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "train" / "tiny_clip.json"


def _env():
    return dict(os.environ, MKL_DEBUG_CPU_TYPE="5", PYTHONPATH=str(ROOT))


def _png(path: Path, size):
    """Decode a PNG, check its pixel size, and that it is a picture (not one flat colour)."""
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.size == size, (path, img.size)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert arr.std() > 10.0, path  # not blank
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50, path  # lines, text and colours, not a flat fill
    return img


def clip_benchmark_build(files, output):
    """CLIP_benchmark's ``build`` (clip_benchmark/cli.py, main_build), reimplemented step by step:
    metrics merged first, then the top-level keys, ``metrics`` dropped, ``model_fullname`` added,
    one CSV row per JSON file, the union of keys as columns."""
    rows, fieldnames = [], set()
    for path in files:
        with open(path) as f:
            data = json.load(f)
        row = {}
        row.update(data["metrics"])
        row.update(data)
        del row["metrics"]
        row["model_fullname"] = row["model"] + " " + row["pretrained"]
        fieldnames.update(row.keys())
        rows.append(row)
    with open(output, "w") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


# ----------------------------------------------------------------------------- units


def test_retrieval_rankings_match_brute_force_and_recall():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(9, 8)).astype(np.float32)
    txt = rng.normal(size=(20, 8)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    txt[3] = img[1]  # exact ties exercise the tie rule
    t2i = np.repeat(np.arange(9), [3, 3, 2, 2, 2, 2, 2, 2, 2])[:20]
    r = retrieval_rankings(img, txt, t2i, k=4, chunk=7)  # chunk smaller than the query count
    sim = txt @ img.T
    for q in range(20):
        order = np.argsort(-sim[q], kind="stable")
        np.testing.assert_array_equal(r["t2i_topk"][q], order[:4])
        np.testing.assert_allclose(r["t2i_scores"][q], sim[q, order[:4]], rtol=1e-6)
        assert r["t2i_rank"][q] == int((sim[q] >= sim[q, t2i[q]]).sum() - 1)
    for i in range(9):
        best = sim[t2i == i, i].max()
        assert r["i2t_rank"][i] == int(((sim[:, i] >= best) & (t2i != i)).sum())
    m = retrieval_metrics(img, txt, t2i, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx((r["t2i_rank"] < k).mean())
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx((r["i2t_rank"] < k).mean())


def test_clip_benchmark_files_build_one_row_per_evaluation(tmp_path):
    records = [
        make_record("cifar10", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.5},
                    "ViT-B-32", "/ckpt/laion2b.safetensors"),
        make_record("imagenet1k", "zeroshot_classification", {"acc1": 0.6, "acc5": None}, "ViT-B-32", None),
        make_record("flickr30k", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.8}, "ViT-B-32", None),
    ]
    written = write_evaluation_files(records, tmp_path)
    names = sorted(p.name for p in tmp_path.glob("*.json"))
    assert names == sorted(record_filename(r) for r in records) and len(names) == 3
    assert "cifar10_laion2b.safetensors_ViT-B-32_en_zeroshot_classification.json" in names
    assert (tmp_path / "results.jsonl") in written
    for path in tmp_path.glob("*.json"):  # exactly CLIP_benchmark's keys
        assert set(json.loads(path.read_text())) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    clip_benchmark_build(sorted(tmp_path.glob("*.json")), tmp_path / "benchmark.csv")
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    by = {r["dataset"]: r for r in rows}
    assert by["cifar10"]["acc1"] == "0.5" and by["cifar10"]["model_fullname"] == "ViT-B-32 /ckpt/laion2b.safetensors"
    assert by["imagenet1k"]["acc5"] == "" and by["flickr30k"]["image_retrieval_recall@5"] == "0.8"
    assert read_records(tmp_path) == [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    # the combined list (the old results.json shape) is what CLIP_benchmark cannot merge
    (tmp_path / "old.json").write_text(json.dumps(records))
    with pytest.raises(TypeError, match="list indices"):
        clip_benchmark_build([tmp_path / "old.json"], tmp_path / "x.csv")


def test_many_classes_report_from_saved_predictions(tmp_path):
    """60 classes: best/worst-25 bars, no confusion plot, a pairs table; drawn from files alone."""
    rng = np.random.default_rng(1)
    n_cls, n = 60, 600
    labels = np.repeat(np.arange(n_cls), 10)
    topk = np.stack([rng.permutation(n_cls)[:5] for _ in range(n)])
    good = rng.random(n) < np.linspace(0.05, 0.95, n_cls)[labels]
    topk[good, 0] = labels[good]
    rec = make_record("many", "zeroshot_classification", {"acc1": float(good.mean()), "acc5": 0.5,
                                                           "num_samples": n, "num_classes": n_cls}, "m", None)
    write_evaluation_files([rec], tmp_path)
    folder = pages.eval_folder(tmp_path, rec)
    folder.mkdir()
    names = [f"class number {i}" for i in range(n_cls)]
    np.savez_compressed(folder / "predictions.npz", labels=labels, topk=topk, classnames=np.asarray(names),
                        sample_names=np.asarray([f"{i}.jpg" for i in range(n)]))
    written = pages.render_reports(tmp_path)
    assert {p.name for p in written} == {"per_class_accuracy.png", "confused_pairs.csv", "report.html"}
    assert not (folder / "confusion.png").exists()
    # two panels of 25 bars: width 2 + 0.07 * 15 + 2 * 4.5 in, height 1.4 + 0.26 * 25 in, at 100 dpi
    _png(folder / "per_class_accuracy.png", (1205, 790))
    page = (tmp_path / "report.html").read_text()
    pairs = re.search(r'<table class="pairs">(.*?)</table>', page, re.S).group(1)
    assert pairs.count("<tr>") == 1 + pages.CONFUSED_PAIRS
    worst = re.search(r'<table class="worst">(.*?)</table>', page, re.S).group(1)
    assert worst.count("<tr>") == 1 + pages.WORST_CLASSES
    assert worst.count('class="noimg"') == pages.WORST_CLASSES * pages.EXAMPLES_PER_CLASS  # no thumbnails saved
    with open(folder / "confused_pairs.csv") as f:
        assert sum(int(r["count"]) for r in csv.DictReader(f)) == int((topk[:, 0] != labels).sum())


# ----------------------------------------------------------------------------- evaluation on the demo data


@pytest.fixture(scope="module")
def demo_eval(tmp_path_factory):
    """``run_zero_shot_eval.py`` on the demo held-out set plus a retrieval set of demo captions."""
    from paddlemix.data import demo
    from paddlemix.eval.runner import main as eval_main

    base = tmp_path_factory.mktemp("demo_eval")
    paths = demo.make_demo_dataset(base / "demo", num_train=64, num_eval_per_class=3, image_size=32)
    entries = json.loads((paths.root / "train.json").read_text())[:24]
    ret = base / "demo_captions.json"
    ret.write_text(json.dumps([{"image": e["image"], "caption": [e["caption"], e["caption"].upper()]}
                               for e in entries]))
    out = base / "out"
    real = demo.make_demo_dataset
    demo.make_demo_dataset = lambda root=None, **kw: real(root, num_train=64, num_eval_per_class=3, image_size=32)
    try:
        assert eval_main(["--model", "CLIP-tiny-demo", "--classification_eval", "demo", "--data_root",
                          str(base / "demo"), "--retrieval_eval", str(ret), "--retrieval_image_root", str(paths.root),
                          "--output_dir", str(out), "--dataloader_num_workers", "0", "--disable_tqdm"]) == 0
    finally:
        demo.make_demo_dataset = real
    return out


def test_demo_eval_writes_every_file(demo_eval):
    out = demo_eval
    cls = out / "demo_zeroshot_classification"
    ret = out / "demo_captions_zeroshot_retrieval"
    for path in [out / "demo_none_CLIP-tiny-demo_en_zeroshot_classification.json",
                 out / "demo_captions_none_CLIP-tiny-demo_en_zeroshot_retrieval.json", out / "results.jsonl",
                 out / "report.html", out / "retrieval.html", cls / "predictions.npz", cls / "confused_pairs.csv",
                 ret / "predictions.npz"]:
        assert path.is_file() and path.stat().st_size > 0, path
    # 16 demo classes, longest name "yellow triangle": 7.55 x 5.56 in; confusion 8.82 x 7.62 in; at 100 dpi
    _png(cls / "per_class_accuracy.png", (755, 556))
    _png(cls / "confusion.png", (882, 762))
    _png(ret / "recall_at_k.png", (500, 340))
    for thumb in list((cls / "thumbs").glob("*.jpg")) + list((ret / "thumbs").glob("*.jpg")):
        assert Image.open(thumb).size == (32, 32)  # demo pictures are smaller than a thumbnail: kept as they are
    # pages stay small: thumbnails, not originals
    assert (out / "report.html").stat().st_size < 400_000 and (out / "retrieval.html").stat().st_size < 400_000


def test_demo_report_html_rows_and_thumbnails(demo_eval):
    out = demo_eval
    cls = out / "demo_zeroshot_classification"
    page = (out / "report.html").read_text()
    (rec,) = [r for r in read_records(out) if r["task"] == "zeroshot_classification"]
    summary = re.search(r'<table class="summary">(.*?)</table>', page, re.S).group(1)
    assert summary.count("<tr>") == 2 and f'{100 * rec["metrics"]["acc1"]:.2f}%' in summary
    assert page.count('<img class="plot"') == 2  # per-class and confusion, embedded

    # what the page must show, recomputed from the saved predictions
    with np.load(cls / "predictions.npz") as z:
        labels, topk, names = z["labels"], z["topk"], list(z["classnames"])
    assert len(labels) == 48 and topk.shape == (48, 5) and len(names) == 16
    pred = topk[:, 0]
    assert (pred == labels).mean() == pytest.approx(rec["metrics"]["acc1"])
    acc = np.array([(pred[labels == c] == c).mean() for c in range(16)])
    wrong = {c: np.flatnonzero((labels == c) & (pred != c)) for c in range(16)}
    worst = sorted((c for c in range(16) if len(wrong[c])), key=lambda c: (acc[c], -c))[:pages.WORST_CLASSES]  # lowest accuracy, later index first on ties
    n_thumbs = sum(min(len(wrong[c]), pages.EXAMPLES_PER_CLASS) for c in worst)
    table = re.search(r'<table class="worst">(.*?)</table>', page, re.S).group(1)
    assert table.count("<tr>") == 1 + len(worst)
    assert table.count('src="data:image/jpeg;base64,') == n_thumbs
    assert len(list((cls / "thumbs").glob("*.jpg"))) == n_thumbs
    for c in worst:
        assert f"<b>{names[c]}</b>" in table
    assert table.count("predicted: ") == n_thumbs and table.count("true: ") == n_thumbs
    n_pairs = min(pages.CONFUSED_PAIRS, len({(a, b) for a, b in zip(labels, pred) if a != b}))
    pairs = re.search(r'<table class="pairs">(.*?)</table>', page, re.S).group(1)
    assert pairs.count("<tr>") == 1 + n_pairs


def test_demo_retrieval_html_rows_and_thumbnails(demo_eval):
    out = demo_eval
    ret = out / "demo_captions_zeroshot_retrieval"
    page = (out / "retrieval.html").read_text()
    (rec,) = [r for r in read_records(out) if r["task"] == "zeroshot_retrieval"]
    with np.load(ret / "predictions.npz") as z:
        r = {k: z[k] for k in z.files}
    assert r["t2i_topk"].shape == (48, 10) and r["i2t_topk"].shape == (24, 10)
    for k in (1, 5, 10):  # the saved rankings are the evaluated ones
        assert (r["t2i_rank"] < k).mean() == pytest.approx(rec["metrics"][f"image_retrieval_recall@{k}"])
        assert (r["i2t_rank"] < k).mean() == pytest.approx(rec["metrics"][f"text_retrieval_recall@{k}"])
    queries = np.linspace(0, 47, 8).round().astype(int)
    t2i = re.search(r'<table class="t2i">(.*?)</table>', page, re.S).group(1)
    assert t2i.count("<tr>") == 1 + 8
    assert t2i.count('src="data:image/jpeg;base64,') == 8 * 5
    gt = r["text_to_image"][queries]
    assert t2i.count("&#10003; ground truth") == int((r["t2i_topk"][queries, :5] == gt[:, None]).any(1).sum())
    assert t2i.count("ground truth ranked #") == 8
    i2t = re.search(r'<table class="i2t">(.*?)</table>', page, re.S).group(1)
    assert i2t.count("<tr>") == 1 + 6 and i2t.count('src="data:image/jpeg;base64,') == 6
    assert i2t.count("<li>") == 6 * 5
    images = np.linspace(0, 23, 6).round().astype(int)
    right = sum(int((r["text_to_image"][r["i2t_topk"][i, :5]] == i).sum()) for i in images)
    assert i2t.count('<span class="ok">&#10003;</span>') == right
    _png(ret / "recall_at_k.png", (500, 340))


def test_paddlemix_report_reproduces_eval_outputs(demo_eval, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo_eval, copy)
    drawn = [p for p in copy.rglob("*") if p.suffix in (".png", ".html", ".csv")]
    before = {p: p.read_bytes() for p in drawn}
    assert len(before) == 6  # 3 plots, 2 pages, 1 pairs table
    for p in drawn:
        p.unlink()
    shutil.rmtree(copy / "classifier_cache")
    res = subprocess.run([sys.executable, "-m", "paddlemix.report", str(copy)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for p, data in before.items():
        assert p.read_bytes() == data, p
    # CLIP_benchmark's build over OUTPUT_DIR/*.json: one row per evaluation
    clip_benchmark_build(sorted(copy.glob("*.json")), tmp_path / "benchmark.csv")
    with open(tmp_path / "benchmark.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["task"] for r in rows) == ["zeroshot_classification", "zeroshot_retrieval"]
    assert all(r["model_fullname"] == "CLIP-tiny-demo " for r in rows)


# ----------------------------------------------------------------------------- training


def test_visualdl_hparams_cause_and_fix(tmp_path):
    """The crash of ``--report_to visualdl``: a bool reaches VisualDL's int field; the fix hands str."""
    from visualdl.component.base_component import hparam

    from paddlemix.train.reporting import visualdl_hparams
    from paddlemix.train.trainer import PreTrainingArguments

    args = PreTrainingArguments(output_dir=str(tmp_path), report_to=["visualdl"])
    raw = args.to_sanitized_dict()
    assert any(isinstance(v, bool) for v in raw.values())
    with pytest.raises(TypeError, match="got a boolean"):
        hparam("x", raw, [], 0)
    clean = visualdl_hparams(args)
    assert not any(isinstance(v, bool) for v in clean.values()) and clean["do_train"] == str(args.do_train)
    record = hparam("x", clean, [], 0)
    assert len(record.values[0].hparam.hparamInfos) == len(clean)


class _Counter:
    def __init__(self, counts):
        self.counts = counts


def test_training_scalars_scale_bias_and_skips():
    import paddle

    from paddlemix.models import CLIP, CLIPConfig
    from paddlemix.train.reporting import training_scalars

    cfg = json.loads(TINY.read_text())
    model = CLIP(CLIPConfig.from_dict({**cfg, "init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}))
    out = training_scalars(model, [_Counter({"corrupt_image": 2, "bad_json": 1}), _Counter({"corrupt_image": 3}), None])
    assert out == {"logit_scale": 10.0, "logit_bias": -10.0, "skipped_samples": 6, "skipped_bad_json": 1,
                   "skipped_corrupt_image": 5}
    plain = CLIP(CLIPConfig.from_dict(cfg))
    assert set(training_scalars(plain)) == {"logit_scale"}
    assert isinstance(model.logit_scale, paddle.Tensor)


def test_train_curves_from_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": s, "loss": 5.0 / s, "learning_rate": 1e-3 * min(1, s / 3), "logit_scale": 14.3 + s,
              "logit_bias": -10 + 0.1 * s, "samples_per_second": 300.0, "skipped_samples": s // 3,
              "skipped_corrupt_image": s // 3} for s in range(1, 41)]
    lines += [{"step": 20, "eval_acc1": 0.3, "eval_acc5": 0.7}, {"step": 40, "eval_acc1": 0.5, "eval_acc5": 0.9}]
    lines += [{"step": 10, "loss": 0.25}]  # a resumed run rewrote step 10: the later line wins
    log.write_text("".join(json.dumps(e) + "\n" for e in lines))
    series = plots.read_train_log(log)
    assert dict(series["loss"])[10] == 0.25 and len(series["loss"]) == 40
    assert series["eval_acc1"] == [(20, 0.3), (40, 0.5)]
    plots.plot_train_curves(log, tmp_path / "train_curves.png")
    _png(tmp_path / "train_curves.png", (1400, 750))


def test_training_with_visualdl_logs_scalars_and_curves(tmp_path):
    """``run_pretrain_dist.py --report_to visualdl`` with a SigLIP model: no crash, the named scalars in
    the VisualDL log, train_curves.png, and ``paddlemix.report`` redraws the same picture."""
    from visualdl import LogReader

    from paddlemix.data.demo import make_demo_dataset

    demo_root = tmp_path / "demo"
    make_demo_dataset(demo_root, num_train=64, num_eval_per_class=2, image_size=32)
    model_cfg = tmp_path / "tiny_siglip.json"
    model_cfg.write_text(json.dumps({**json.loads(TINY.read_text()), "init_logit_scale": math.log(10.0),
                                     "init_logit_bias": -10.0}))
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "examples" / "clip" / "run_pretrain_dist.py"), "--model", str(model_cfg),
           "--loss", "siglip", "--task_name", "demo", "--data_root", str(demo_root), "--output_dir", str(out),
           "--max_steps", "4", "--per_device_train_batch_size", "16", "--learning_rate", "5e-4", "--warmup_steps",
           "1", "--logging_steps", "1", "--save_strategy", "no", "--dataloader_num_workers", "0", "--seed", "7",
           "--disable_tqdm", "true", "--report_to", "visualdl", "--logging_dir", str(out / "vdl"), "--do_train",
           "true", "--classification_eval", "demo", "--evaluation_strategy", "steps", "--eval_steps", "2"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]

    (log_file,) = list((out / "vdl").glob("vdlrecords.*.log"))
    reader = LogReader(file_path=str(log_file))
    tags = reader.get_tags()
    for tag in ("train/loss", "train/learning_rate", "train/logit_scale", "train/logit_bias",
                "train/samples_per_second", "train/skipped_samples", "eval/acc1", "eval/acc5"):
        assert tag in tags["scalar"], (tag, tags["scalar"])
    assert [r.id for r in reader.get_data("scalar", "train/loss")] == [1, 2, 3, 4]
    assert [r.id for r in reader.get_data("scalar", "eval/acc1")][:2] == [2, 4]
    bias = [r.value for r in reader.get_data("scalar", "train/logit_bias")]
    assert len(bias) == 4 and all(-11 < b < -9 for b in bias)
    assert all(r.value == 0 for r in reader.get_data("scalar", "train/skipped_samples"))
    (hp,) = reader.get_data("hyper_parameters", "hparam")
    infos = {i.name: i for i in hp.hparam.hparamInfos}
    assert infos["do_train"].string_value == "True" and infos["max_steps"].int_value == 4

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("logit_bias" in e and "logit_scale" in e and "skipped_samples" in e for e in log if "loss" in e)
    curves = out / "train_curves.png"
    _png(curves, (1400, 750))
    first = curves.read_bytes()
    curves.unlink()
    res = subprocess.run([sys.executable, "-m", "paddlemix.report", str(out)], env=_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert curves.read_bytes() == first


# ----------------------------------------------------------------------------- a real browser


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = ('<script>window.addEventListener("load", () => {const im = [...document.images];'
          'document.body.dataset.images = im.length;'
          'document.body.dataset.decoded = im.filter(i => i.complete && i.naturalWidth > 0).length;});</script>')


def _chromium_run(html: Path, profile: Path, *flags) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *flags, html.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("page", ["report.html", "retrieval.html"])
def test_pages_render_in_headless_chromium(demo_eval, tmp_path, page):
    """The page opened from disk: every embedded plot and thumbnail decodes, and the screenshot is a page."""
    html = (demo_eval / page).read_text()
    n_img = html.count("<img ")
    thumbs = len(list((demo_eval / "demo_zeroshot_classification" / "thumbs").glob("*.jpg")))
    assert n_img == (2 + thumbs if page == "report.html" else 1 + 8 * 5 + 6)  # plots + thumbnails
    shot = tmp_path / "shot.png"
    _chromium_run(demo_eval / page, tmp_path / "p1", f"--screenshot={shot}", "--window-size=1280,2000")
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert img.shape == (2000, 1280, 3)
    assert (np.abs(img - 255).sum(axis=2) > 60).mean() > 0.03  # plots and tables, not an empty page
    # The same page with a probe that counts, after load, the images the browser decoded.
    probe = tmp_path / page
    probe.write_text(html.replace("</body>", _PROBE + "</body>"))
    dom = _chromium_run(probe, tmp_path / "p2", "--dump-dom")
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-images="{n_img}"' in body and f'data-decoded="{n_img}"' in body, body


def test_report_cli_says_when_there_is_nothing_to_draw(tmp_path, caplog):
    from paddlemix.report import main

    assert main([str(tmp_path / "missing")]) == 2
    (tmp_path / "config.json").write_text("{}")  # a model folder: not an evaluation record
    assert main([str(tmp_path)]) == 1
    assert "holds no train_log.jsonl and no evaluation results" in caplog.text


def test_cifar_thumbnails_are_the_array_pictures(tmp_path):
    """CIFAR keeps its pictures in one array: the thumbnails are those pixels (JPEG-close)."""
    import importlib.util

    from paddlemix.eval.datasets import CifarDataset

    spec = importlib.util.spec_from_file_location("eval_synthetic", ROOT / "tests" / "fixtures" / "eval" / "synthetic.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    images = np.zeros((20, 32, 32, 3), np.uint8)
    images[:] = (np.arange(20)[:, None, None, None] * 12).astype(np.uint8)  # one flat grey level per picture
    labels = np.arange(20) % 10
    synthetic.write_cifar(tmp_path / "data", "cifar10", images, labels, names)
    ds = CifarDataset(tmp_path / "data")
    topk = (labels[:, None] + 1 + np.arange(5)[None, :]) % 10  # every top-1 wrong, true class not in the top 5
    rec = make_record("cifar10", "zeroshot_classification", {"acc1": 0.0, "num_samples": 20, "num_classes": 10}, "m", None)
    folder = pages.save_classification(tmp_path / "out", rec, {"labels": labels, "topk": topk}, names, ds)
    shown = pages.misclassified_examples(labels, topk, 10)
    assert len(shown) == pages.WORST_CLASSES and all(len(v) == 2 for v in shown.values())
    for i in (i for idx in shown.values() for i in idx):
        thumb = np.asarray(Image.open(folder / "thumbs" / f"{i:06d}.jpg").convert("RGB"), np.float32)
        assert thumb.shape == (32, 32, 3) and np.abs(thumb - 12 * i).max() <= 2
    with np.load(folder / "predictions.npz") as z:
        assert list(z["sample_names"][:2]) == ["#0", "#1"]
