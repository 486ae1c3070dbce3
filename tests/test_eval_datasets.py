"""Evaluation data loaders: CIFAR in the real release format, ImageFolder eval sets, retrieval JSON, STS TSV."""
import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddlemix.data.transforms import image_transform
from paddlemix.eval.datasets import (
    CifarDataset,
    ImageFolderDataset,
    RetrievalDataset,
    UnsafePickleError,
    format_template,
    load_classification_eval,
    read_sts_tsv,
    restricted_pickle_load,
    validate_templates,
)
from paddlemix.eval.imagenet_metadata import CIFAR_TEMPLATES, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

_spec = importlib.util.spec_from_file_location("eval_synthetic", Path(__file__).parent / "fixtures" / "eval" / "synthetic.py")
synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synthetic)

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("py2", [True, False], ids=["python2-cPickle", "python3-protocol2"])
def test_cifar10_release_layout(tmp_path, py2):
    images = _cifar_images(7)
    labels = [3, 0, 9, 9, 1, 5, 2]
    synthetic.write_cifar(tmp_path, "cifar10", images, labels, CIFAR10_NAMES, py2=py2)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the release folder itself
        ds = CifarDataset(root)
        assert ds.variant == "cifar10" and len(ds) == 7 and ds.classes == CIFAR10_NAMES
        np.testing.assert_array_equal(ds.images, images)  # channel-planar rows -> HWC pixels
        img, label = ds[2]
        assert isinstance(img, Image.Image) and img.size == (32, 32) and img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), images[2])
        assert int(label) == 9


def test_cifar100_fine_labels_and_names(tmp_path):
    names = ["apple", "aquarium_fish", "maple_tree", "sweet_pepper", "willow_tree"]
    images = _cifar_images(4, seed=1)
    synthetic.write_cifar(tmp_path, "cifar100", images, [1, 4, 0, 3], names)
    tf = image_transform(32, is_train=False, output="numpy")
    evalset = load_classification_eval(tmp_path / "cifar-100-python", tf)
    assert evalset.name == "cifar100"
    assert evalset.classnames == ["apple", "aquarium fish", "maple tree", "sweet pepper", "willow tree"]
    assert evalset.templates == list(CIFAR_TEMPLATES) and len(CIFAR_TEMPLATES) == 18
    x, y = evalset.dataset[1]
    assert x.shape == (3, 32, 32) and x.dtype == np.float32 and int(y) == 4
    np.testing.assert_array_equal(x, tf(Image.fromarray(images[1])))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    """A pickle that would run a command is rejected before any global is resolved."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    evil = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (folder / "test_batch").write_bytes(evil)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        CifarDataset(tmp_path)
    assert not marker.exists()
    (folder / "test_batch").write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_pickle_load(folder / "test_batch")


def test_cifar_wrong_content_is_reported(tmp_path):
    synthetic.write_cifar(tmp_path, "cifar10", _cifar_images(3), [0, 1, 12], CIFAR10_NAMES)
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        CifarDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not an extracted CIFAR"):
        CifarDataset(tmp_path / "nothing-here")


def test_image_folder_eval_set(tmp_path):
    classes = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("blue", "circle")]
    names = synthetic.write_image_folder(tmp_path, classes, per_class=3)
    tf = image_transform(32, is_train=False, output="numpy")
    evalset = load_classification_eval(tmp_path, tf)
    ds = evalset.dataset
    assert isinstance(ds, ImageFolderDataset)
    # Sorted folder order defines the label index; labels.txt line i names folder i.
    assert ds.classes == ["blue_circle", "blue_square", "green_triangle", "red_circle"]
    assert evalset.classnames == names == ["blue circle", "blue square", "green triangle", "red circle"]
    assert evalset.templates == ["a photo of a {}.", "a drawing of a {}."]
    assert evalset.name == tmp_path.name and len(ds) == 12
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    x, y = ds[7]
    assert int(y) == 2
    np.testing.assert_array_equal(x, tf(Image.open(tmp_path / "images" / "green_triangle" / "001.png")))


def test_image_folder_defaults_imagenet_names_and_templates(tmp_path):
    """No labels.txt / templates.txt and 1000 class folders: the ImageNet-1k names and 80 OpenAI templates."""
    images = tmp_path / "val"
    tiny = Image.new("RGB", (4, 4), (1, 2, 3))
    for i in range(1000):
        (images / f"n{i:08d}").mkdir(parents=True)
        tiny.save(images / f"n{i:08d}" / "x.png")
    evalset = load_classification_eval(images)  # bare <class>/<file> layout, as ImageNet val
    assert evalset.classnames == list(IMAGENET_CLASSNAMES)
    assert evalset.templates == list(OPENAI_IMAGENET_TEMPLATES)
    assert len(evalset.dataset) == 1000
    assert evalset.classnames[0] == "tench" and evalset.classnames[999] == "toilet paper"
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."


def test_image_folder_falls_back_to_folder_names(tmp_path):
    synthetic.write_image_folder(tmp_path, [("red", "circle"), ("green", "square")], per_class=1, labels=False, templates=())
    evalset = load_classification_eval(tmp_path)
    assert evalset.classnames == ["green square", "red circle"]
    assert evalset.templates == list(OPENAI_IMAGENET_TEMPLATES)


def test_image_folder_errors_name_the_fix(tmp_path):
    synthetic.write_image_folder(tmp_path, [("red", "circle"), ("green", "square")], per_class=1)
    (tmp_path / "labels.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="lists 1 class names but the image folder has 2"):
        load_classification_eval(tmp_path)
    (tmp_path / "labels.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"blank line\(s\) \[2\]"):
        load_classification_eval(tmp_path)
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "templates.txt").write_text("a photo of a thing.\n")
    with pytest.raises(ValueError, match="exactly one"):
        load_classification_eval(tmp_path)
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    (tmp_path / "images" / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="hold no images"):
        load_classification_eval(tmp_path)
    (tmp_path / "images" / "empty_class").rmdir()
    (tmp_path / "images" / "red_circle" / "000.png").write_bytes(b"not a png")
    ds = load_classification_eval(tmp_path).dataset
    with pytest.raises(OSError, match="000.png"):
        ds[1]


def test_templates_accept_both_placeholder_styles():
    assert validate_templates(["a {} photo", "a {c} photo", "itap of {0}"]) == ["a {} photo", "a {c} photo", "itap of {0}"]
    assert format_template("a {c} photo", "cat") == format_template("a {} photo", "cat") == "a cat photo"
    assert format_template("{{literal}} {}", "dog") == "{literal} dog"
    for bad in ["no field", "{} and {}", "{name}", "unclosed {"]:
        with pytest.raises(ValueError, match="template"):
            validate_templates([bad])


def test_retrieval_json(tmp_path):
    path = synthetic.write_retrieval_json(tmp_path, n_images=4)
    ds = RetrievalDataset(path)
    assert len(ds) == 4 and len(ds.texts) == 12
    assert ds.text_to_image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert ds.texts[3] == "a red square in picture 1"
    img, idx = ds[2]
    assert int(idx) == 2 and img.size == (48, 40)
    entries = json.loads(path.read_text())
    entries[1]["caption"] = "a single caption string"  # Flickr-style str caption is accepted
    entries.append({"image": "imgs/missing.png", "caption": ["x"]})
    path.write_text(json.dumps(entries))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        RetrievalDataset(path)
    with pytest.raises(FileNotFoundError, match="not found under"):
        RetrievalDataset(path, image_root=tmp_path / "elsewhere")


@pytest.mark.parametrize("header", [False, True])
def test_sts_tsv(tmp_path, header):
    pairs = read_sts_tsv(synthetic.write_sts_tsv(tmp_path / "sts-test.tsv", header=header))
    assert pairs.name == "sts-test" and len(pairs.scores) == 8
    assert pairs.sentences1[0] == "a man is playing a guitar" and pairs.sentences2[0] == "a person plays the guitar"
    assert pairs.sentences1[6] == 'he said "hello" twice'  # quotes are data, not CSV quoting
    assert pairs.scores.tolist()[:3] == [4.6, 0.4, 3.8]
    (tmp_path / "bad.tsv").write_text("a\tb\t4\nc\td\tfive\n")
    with pytest.raises(ValueError, match="row 2 score 'five'"):
        read_sts_tsv(tmp_path / "bad.tsv")


def test_demo_eval_set(tmp_path):
    """The built-in demo data's held-out set (paddlemix.data.demo) opens as a 16-class ImageFolder eval."""
    from paddlemix.data.demo import class_names, make_demo_dataset

    paths = make_demo_dataset(tmp_path / "demo", num_train=16, num_eval_per_class=2, image_size=32)
    evalset = load_classification_eval(paths.eval_root, image_transform(32, is_train=False, output="numpy"))
    assert evalset.classnames == class_names() and len(evalset.classnames) == 16
    assert evalset.dataset.classes == [c.replace(" ", "_") for c in class_names()]
    assert evalset.templates == read_lines_of(paths.eval_root / "templates.txt")
    assert len(evalset.dataset) == 32 and evalset.dataset.targets == [i // 2 for i in range(32)]
    x, y = evalset.dataset[5]
    assert x.shape == (3, 32, 32) and int(y) == 2


def read_lines_of(path):
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_cifar_pickle_memo_index_costs_no_memory(tmp_path):
    """The C unpickler sizes its memo by the largest index (2**28 here: gigabytes); the shared reader does not."""
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02N" + b"r" + (1 << 28).to_bytes(4, "little") + b".")
    assert restricted_pickle_load(path) is None


def test_cifar_pickle_errors_are_the_zoo_checkpoint_error(tmp_path):
    from paddlemix.zoo.checkpoint import CheckpointError

    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(CheckpointError, match=str(path)):
        restricted_pickle_load(path)
    path.write_bytes(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(CheckpointError, match="corrupt or unreadable pickle"):
        restricted_pickle_load(path)
