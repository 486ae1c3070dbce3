"""Zero-shot classification: the classifier against PyTorch reference features, the cache, the
distributed split, and ``run_zero_shot_eval.py`` end to end on a generated ImageFolder eval set."""
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddlemix.eval.common as common
import paddlemix.eval.zero_shot as zs
from paddlemix.data.tokenizer import SimpleTokenizer
from paddlemix.data.transforms import image_transform
from paddlemix.eval.datasets import load_classification_eval
from paddlemix.eval.runner import main as eval_main
from paddlemix.factory import create_model

FIXTURES = Path(__file__).parent / "fixtures"
REF = FIXTURES / "parity" / "openai_quickgelu"
_spec = importlib.util.spec_from_file_location("eval_synthetic", FIXTURES / "eval" / "synthetic.py")
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)

# Six classes (>= 5, so top-5 is reported), two images each.
CLASSES = [("red", "circle"), ("red", "square"), ("green", "triangle"), ("blue", "circle"), ("blue", "square"), ("green", "circle")]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class ArrayDataset(paddle.io.Dataset):
    def __init__(self, images, labels):
        super().__init__()
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], np.int64(self.labels[i])


class LookupTokenizer:
    """Maps each prompt to a stored row of token ids (the fixture's vocabulary has 512 ids)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, texts):
        return np.stack([self.table[t] for t in texts])


# ----------------------------------------------------------------- against the PyTorch reference


@pytest.fixture(scope="module")
def reference():
    model = create_model(REF / "model_config.json", pretrained=REF / "model.safetensors")
    return model, dict(np.load(REF / "inputs.npz")), dict(np.load(REF / "outputs.npz"))


def test_single_template_classifier_is_the_reference_text_features(reference):
    """Three stored captions = three classes, the two stored images = queries."""
    model, inputs, outputs = reference
    names = ["class a", "class b", "class c"]
    tok = LookupTokenizer({n: inputs["text"][i] for i, n in enumerate(names)})
    w = zs.build_zero_shot_classifier(model, tok, names, ["{}"], progress=False).numpy()
    ref_w = _unit(outputs["text_features"]).T
    np.testing.assert_allclose(w, ref_w, atol=1e-4)

    ref_logits = 100.0 * _unit(outputs["image_features"]) @ ref_w
    ref_order = np.argsort(-ref_logits, axis=1)
    gaps = np.diff(np.sort(ref_logits, axis=1), axis=1)
    assert gaps.min() > 1e-2, "reference logits too close to make the ranking comparison meaningful"
    labels = ref_order[:, 0]
    pred = zs.zero_shot_predictions(model, w, ArrayDataset(inputs["image"], labels), batch_size=2, progress=False)
    np.testing.assert_array_equal(pred["topk"], ref_order)  # full ranking of all 3 classes, both images
    assert pred["correct@1"].all()
    wrong = (labels + 1) % 3
    pred = zs.zero_shot_predictions(model, w, ArrayDataset(inputs["image"], wrong), batch_size=1, progress=False)
    assert not pred["correct@1"].any()


def test_template_ensemble_matches_reference_features(reference):
    """Two templates per class: each prompt embedding normalised, averaged, normalised again."""
    model, inputs, outputs = reference
    # class -> the stored caption each of its two prompts is tokenised to
    rows = {"A": (0, 1), "B": (1, 2), "C": (2, 0)}
    table = {f"{c} x": inputs["text"][r[0]] for c, r in rows.items()}
    table.update({f"{c} y": inputs["text"][r[1]] for c, r in rows.items()})
    w = zs.build_zero_shot_classifier(model, LookupTokenizer(table), list(rows), ["{} x", "{} y"], batch_size=4,
                                      progress=False).numpy()
    t = _unit(outputs["text_features"])
    ref_w = np.stack([_unit(t[a] + t[b]) for a, b in rows.values()], axis=1)
    np.testing.assert_allclose(w, ref_w, atol=1e-4)
    ref_top = np.argsort(-(_unit(outputs["image_features"]) @ ref_w), axis=1)
    pred = zs.zero_shot_predictions(model, w, ArrayDataset(inputs["image"], ref_top[:, 0]), progress=False)
    np.testing.assert_array_equal(pred["topk"], ref_top)


# ------------------------------------------------------------- a tiny model with the real vocabulary


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthetic.tiny_clip(tmp_path_factory.mktemp("tiny"), seed=1234)


@pytest.fixture(scope="module")
def evalset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalset")
    synthetic.write_image_folder(root, CLASSES, per_class=2, templates=TEMPLATES)
    return root


def _numpy_reference(model, root):
    """Independent computation: per-image encode, per-class template features averaged in numpy."""
    evalset = load_classification_eval(root)
    tok = SimpleTokenizer(context_length=model.context_length)
    with paddle.no_grad():
        feats = []
        for name in evalset.classnames:
            t = model.encode_text(paddle.to_tensor(tok.batch_encode([tp.format(name) for tp in evalset.templates])))
            feats.append(_unit(_unit(t.numpy()).mean(0)))
        w = np.stack(feats, axis=1)
        tf = image_transform(32, is_train=False, output="paddle")
        imgs = np.concatenate([model.encode_image(tf(evalset.dataset[i][0]).unsqueeze(0)).numpy()
                               for i in range(len(evalset.dataset))])
    labels = np.array(evalset.dataset.targets)
    return w, 100.0 * _unit(imgs) @ w, labels


def test_classifier_matches_numpy_with_real_tokenizer(tiny, evalset_dir):
    model, _ = tiny
    evalset = load_classification_eval(evalset_dir)
    tok = SimpleTokenizer(context_length=model.context_length)
    w = zs.build_zero_shot_classifier(model, tok, evalset.classnames, evalset.templates, batch_size=5, progress=False)
    ref_w, _, _ = _numpy_reference(model, evalset_dir)
    assert tuple(w.shape) == (32, 6)
    np.testing.assert_allclose(w.numpy(), ref_w, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w.numpy(), axis=0), 1.0, atol=1e-6)


def test_run_zero_shot_eval_end_to_end(tiny, evalset_dir, tmp_path, caplog):
    model, model_dir = tiny
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--classification_eval", str(evalset_dir), "--output_dir", str(out),
            "--per_device_eval_batch_size", "5", "--dataloader_num_workers", "2", "--disable_tqdm"]
    with caplog.at_level(logging.INFO, logger="paddlemix.eval"):
        assert eval_main(args) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1
    rec = records[0]
    assert rec["dataset"] == evalset_dir.name and rec["task"] == "zeroshot_classification"
    assert rec["model"] == str(model_dir)

    _, logits, labels = _numpy_reference(model, evalset_dir)
    order = np.argsort(-logits, axis=1)
    acc1 = float((order[:, 0] == labels).mean())
    acc5 = float((order[:, :5] == labels[:, None]).any(1).mean())
    per_class = np.mean([(order[labels == c, 0] == c).mean() for c in range(6)])
    m = rec["metrics"]
    assert m["num_samples"] == 12 and m["num_classes"] == 6
    assert m["acc1"] == pytest.approx(acc1, abs=1e-12)
    assert m["acc5"] == pytest.approx(acc5, abs=1e-12)
    assert m["mean_per_class_recall"] == pytest.approx(per_class, abs=1e-12)
    assert "mean_per_class_recall" in caplog.text and f"{100 * acc1:.2f}" in caplog.text  # the table was logged

    # Second run: classifier from the cache under the output dir, same numbers.
    cached = list((out / "classifier_cache").glob("zero_shot_classifier_*.npy"))
    assert len(cached) == 1
    args[args.index("--dataloader_num_workers") + 1] = "0"
    assert eval_main(args) == 0
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == records


def test_classifier_cache_key_and_reuse(tiny, evalset_dir, tmp_path, monkeypatch, caplog):
    model, _ = tiny
    tok = SimpleTokenizer(context_length=model.context_length)
    names, cache = ["red circle", "blue square"], tmp_path / "cache"
    key = zs.classifier_cache_key(model, tok, names, TEMPLATES)
    assert key != zs.classifier_cache_key(model, tok, names[::-1], TEMPLATES)
    assert key != zs.classifier_cache_key(model, tok, names, TEMPLATES[:1])
    assert key != zs.classifier_cache_key(model, SimpleTokenizer(context_length=8), names, TEMPLATES)
    assert key != zs.classifier_cache_key(model, tok, names, TEMPLATES, precision="fp16")
    w1 = zs.build_zero_shot_classifier(model, tok, names, TEMPLATES, cache_dir=cache, progress=False).numpy()
    assert (cache / f"zero_shot_classifier_{key}.npy").is_file()

    def no_encoding(*a, **k):
        raise AssertionError("the cached classifier should have been used")

    monkeypatch.setattr(zs, "encode_texts", no_encoding)
    w2 = zs.build_zero_shot_classifier(model, tok, names, TEMPLATES, cache_dir=cache, progress=False).numpy()
    np.testing.assert_array_equal(w1, w2)

    # Any text-tower weight change gives a new key; an image-tower change does not.
    visual = model.visual.patch_embed.weight
    old_v = visual.numpy().copy()
    visual.set_value(old_v + 1.0)
    assert zs.classifier_cache_key(model, tok, names, TEMPLATES) == key
    visual.set_value(old_v)
    text_w = model.text.token_embedding.weight
    old_t = text_w.numpy().copy()
    text_w.set_value(old_t * 1.001)
    try:
        assert zs.classifier_cache_key(model, tok, names, TEMPLATES) != key
    finally:
        text_w.set_value(old_t)

    monkeypatch.undo()
    (cache / f"zero_shot_classifier_{key}.npy").write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        w3 = zs.build_zero_shot_classifier(model, tok, names, TEMPLATES, cache_dir=cache, progress=False).numpy()
    assert "unreadable classifier cache" in caplog.text
    np.testing.assert_array_equal(w1, w3)

    with pytest.raises(ValueError, match="inside the dataset"):
        zs.check_cache_dir(evalset_dir / "cache", evalset_dir)
    assert zs.check_cache_dir(tmp_path / "cache", evalset_dir) == (tmp_path / "cache").resolve()


def test_loader_workers_give_identical_predictions(tiny, evalset_dir):
    model, _ = tiny
    evalset = load_classification_eval(evalset_dir, image_transform(32, is_train=False, output="numpy"))
    w = zs.build_zero_shot_classifier(model, SimpleTokenizer(context_length=16), evalset.classnames,
                                      evalset.templates, progress=False)
    runs = [zs.zero_shot_predictions(model, w, evalset.dataset, batch_size=5, num_workers=n, progress=False)
            for n in (0, 2)]
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])
    np.testing.assert_array_equal(runs[0]["labels"], evalset.dataset.targets)


# ------------------------------------------------------------------------ distributed split


class _Stop(Exception):
    pass


def run_as_ranks(monkeypatch, modules, fn, world=3):
    """Run ``fn(rank)`` as every rank of a ``world``, sequentially in this process.

    Round j replays every rank, answering its first j collectives from earlier rounds and stopping
    it at collective j to capture its payload; once all ranks have given payload j, the gathered
    list is known. The functions are deterministic, so the replays follow the same path. Returns
    rank 0's result and the list of gathered payload lists, one per collective."""
    answers = []
    while True:
        payloads, results = {}, {}
        for rank in range(world):
            calls = iter(range(10 ** 6))

            def gather(obj, w, r=rank, calls=calls):
                assert w == world
                i = next(calls)
                if i < len(answers):
                    assert obj == answers[i][r] if isinstance(obj, bool) else True
                    return answers[i]
                payloads[r] = obj
                raise _Stop

            monkeypatch.setattr(common, "all_gather", gather)
            for mod in modules:
                monkeypatch.setattr(mod, "world_info", lambda distributed=None, r=rank: (r, world))
                if hasattr(mod, "all_gather"):
                    monkeypatch.setattr(mod, "all_gather", gather)
            try:
                results[rank] = fn(rank)
            except _Stop:
                pass
        monkeypatch.undo()
        if len(results) == world:
            return results[0], answers
        assert not results, "ranks disagree on the number of collectives: a real run would hang"
        answers.append([payloads[r] for r in range(world)])


def test_distributed_split_equals_single_process(tiny, evalset_dir, monkeypatch):
    model, _ = tiny
    evalset = load_classification_eval(evalset_dir, image_transform(32, is_train=False, output="numpy"))
    tok = SimpleTokenizer(context_length=16)
    single_w = zs.build_zero_shot_classifier(model, tok, evalset.classnames, evalset.templates, progress=False)
    single = zs.zero_shot_predictions(model, single_w, evalset.dataset, batch_size=4, progress=False)

    w, gathers = run_as_ranks(monkeypatch, [zs], lambda rank: zs.build_zero_shot_classifier(
        model, tok, evalset.classnames, evalset.templates, progress=False))
    assert len(gathers) == 1
    assert [p[0].tolist() for p in gathers[0]] == [[0, 3], [1, 4], [2, 5]]  # classes split by rank
    np.testing.assert_allclose(w.numpy(), single_w.numpy(), atol=1e-6)

    pred, gathers = run_as_ranks(monkeypatch, [zs], lambda rank: zs.zero_shot_predictions(
        model, single_w, evalset.dataset, batch_size=4, progress=False))
    assert len(gathers) == 1  # results gathered once
    assert [p[0].tolist() for p in gathers[0]] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    for key in single:
        np.testing.assert_array_equal(pred[key], single[key])


def test_distributed_ranks_agree_on_the_classifier_cache(tiny, tmp_path, monkeypatch):
    """A cache only some ranks can see (no shared file system) must not make the others hang."""
    model, _ = tiny
    tok = SimpleTokenizer(context_length=16)
    names = ["red circle", "blue square", "green triangle", "red square"]
    shared = tmp_path / "shared"
    single_w = zs.build_zero_shot_classifier(model, tok, names, TEMPLATES, cache_dir=shared, progress=False)

    def build(rank, dirs):
        return zs.build_zero_shot_classifier(model, tok, names, TEMPLATES, cache_dir=dirs[rank], progress=False)

    w, gathers = run_as_ranks(monkeypatch, [zs], lambda r: build(r, [shared, tmp_path / "n1", tmp_path / "n2"]))
    assert gathers[0] == [True, False, False] and len(gathers) == 2  # agreement, then everyone encodes
    np.testing.assert_allclose(w.numpy(), single_w.numpy(), atol=1e-6)

    w, gathers = run_as_ranks(monkeypatch, [zs], lambda r: build(r, [shared] * 3))
    assert gathers == [[True, True, True]]  # all hit: nobody encodes, no further collective
    cached = np.load(next(shared.glob("zero_shot_classifier_*.npy")))  # rank 0 rewrote it in the first run
    np.testing.assert_array_equal(w.numpy(), cached)
    np.testing.assert_allclose(cached, single_w.numpy(), atol=1e-6)


def test_shards_cover_every_sample_once():
    for n in (0, 1, 7, 12):
        for world in (1, 2, 3, 5):
            shards = [common.shard_indices(n, r, world) for r in range(world)]
            assert sorted(np.concatenate(shards).tolist()) == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(RuntimeError, match="exactly once"):
        common.merge_shards([(np.array([0, 1]), np.zeros(2)), (np.array([1]), np.zeros(1))], 3)


def test_classification_eval_demo_keyword(tiny, tmp_path, monkeypatch):
    """``--classification_eval demo`` evaluates the built-in demo data's held-out set (as training does)."""
    import paddlemix.data.demo as demo

    real = demo.make_demo_dataset
    calls = []

    def small_demo(root=None, **kwargs):
        calls.append(root)
        return real(root, num_train=16, num_eval_per_class=1, image_size=32)

    monkeypatch.setattr(demo, "make_demo_dataset", small_demo)
    _, model_dir = tiny
    out = tmp_path / "out"
    assert eval_main(["--model", str(model_dir), "--classification_eval", "demo", "--data_root", str(tmp_path / "d"),
                      "--output_dir", str(out), "--dataloader_num_workers", "0", "--disable_tqdm"]) == 0
    assert calls == [str(tmp_path / "d")]
    (rec,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rec["dataset"] == "demo" and rec["metrics"]["num_classes"] == 16 and rec["metrics"]["num_samples"] == 16


# ------------------------------------------------------------ --pretrained_text_model (PaddleMIX's flag)


@pytest.fixture(scope="module")
def other_text(tmp_path_factory):
    """A second tiny model: its text tower is the one --pretrained_text_model names."""
    return synthetic.tiny_clip(tmp_path_factory.mktemp("other"), seed=99)


def _count_loads(monkeypatch, name):
    """How often ``name`` is built by create_model (the text model must be loaded once)."""
    import paddlemix.factory as factory

    loads = []
    real = factory.create_model

    def counting(model_name, *args, **kwargs):
        if str(model_name) == str(name):
            loads.append(model_name)
        return real(model_name, *args, **kwargs)

    monkeypatch.setattr(factory, "create_model", counting)
    return loads


def test_pretrained_text_model_builds_the_classifier(tiny, other_text, evalset_dir, tmp_path, monkeypatch):
    model, model_dir = tiny
    other, other_dir = other_text
    evalset = load_classification_eval(evalset_dir)
    tok = SimpleTokenizer(context_length=model.context_length)
    own = zs.build_zero_shot_classifier(model, tok, evalset.classnames, evalset.templates, progress=False).numpy()
    theirs = zs.build_zero_shot_classifier(other, tok, evalset.classnames, evalset.templates, progress=False).numpy()
    assert np.abs(own - theirs).max() > 0.1  # the two text towers give different classifiers

    used = []
    real_eval = zs.evaluate_zero_shot

    def recording(*args, **kwargs):
        used.append(kwargs.get("classifier"))
        return real_eval(*args, **kwargs)

    import paddlemix.eval.runner as runner

    monkeypatch.setattr(runner, "evaluate_zero_shot", recording)
    loads = _count_loads(monkeypatch, other_dir)
    base = ["--model", str(model_dir), "--per_device_eval_batch_size", "5", "--dataloader_num_workers", "0",
            "--disable_tqdm", "--no_classifier_cache"]
    assert eval_main(base + ["--classification_eval", str(evalset_dir)]) == 0
    assert used[-1] is None  # default: the evaluated model's own text tower
    args = base + ["--classification_eval", str(evalset_dir), str(evalset_dir), "--pretrained_text_model", str(other_dir),
                   "--output_dir", str(tmp_path / "out")]
    assert eval_main(args) == 0
    assert len(loads) == 1  # loaded once for both eval sets
    for classifier in used[-2:]:
        np.testing.assert_allclose(classifier.numpy(), theirs, atol=1e-6)
    # The image features stay the evaluated model's: the reported accuracy is that of its images against them.
    _, _, labels = _numpy_reference(model, evalset_dir)
    with paddle.no_grad():
        tf = image_transform(32, is_train=False, output="paddle")
        imgs = np.concatenate([model.encode_image(tf(evalset.dataset[i][0]).unsqueeze(0)).numpy()
                               for i in range(len(evalset.dataset))])
    acc1 = float((np.argmax(_unit(imgs) @ theirs, axis=1) == labels).mean())
    rec = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert rec["metrics"]["acc1"] == pytest.approx(acc1, abs=1e-12)


def test_pretrained_text_model_with_another_embedding_width_is_refused(tiny, tmp_path):
    model, _ = tiny
    cfg = json.loads((REF / "model_config.json").read_text())
    cfg["embed_dim"] = 16
    (tmp_path / "narrow.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="embeds text in 16 dimensions but the evaluated model's image features have 32"):
        zs.load_text_model(str(tmp_path / "narrow.json"), model)


def test_training_eval_uses_the_pretrained_text_model_once(tiny, other_text, evalset_dir, monkeypatch):
    from paddlemix.train.pretrain import zero_shot_eval_fn

    model, _ = tiny
    other, other_dir = other_text
    built = []
    real_build = zs.build_zero_shot_classifier

    def recording(m, *args, **kwargs):
        built.append(m)
        return real_build(m, *args, **kwargs)

    monkeypatch.setattr(zs, "build_zero_shot_classifier", recording)
    loads = _count_loads(monkeypatch, other_dir)
    tok = SimpleTokenizer(context_length=model.context_length)
    fixed = zero_shot_eval_fn(model, tok, evalset_dir, 5, 0, "fp32", text_model=str(other_dir))
    own = zero_shot_eval_fn(model, tok, evalset_dir, 5, 0, "fp32")
    first, second = fixed(model), fixed(model)
    assert first == second and len(loads) == 1
    assert len(built) == 1 and built[0] is not model  # one classifier, from the other model's text tower
    own(model)
    assert built[-1] is model  # without the flag: the trained text tower, rebuilt per eval
