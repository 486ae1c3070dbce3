"""Evaluation outputs people look at: saved predictions, plots, ``report.html`` and ``retrieval.html``.

An evaluation saves what the pictures need next to its results (``save_classification`` /
``save_retrieval``): predictions as ``.npz`` and small JPEG thumbnails of the images the pages
show. ``render_reports`` draws every plot and page from those files alone, so
``python -m paddlemix.report OUTPUT_DIR`` redraws them later without the model or the data.

Layout of ``OUTPUT_DIR``::

    {dataset}_{pretrained}_{model}_{language}_{task}.json   one per evaluation (CLIP_benchmark's shape)
    results.jsonl                                           all of them
    report.html, retrieval.html                             single files, images embedded
    {dataset}_{task}/predictions.npz, thumbs/*.jpg, *.png   per evaluation
"""
from __future__ import annotations

import base64
import csv
import html
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import plots
from .report import read_records

logger = logging.getLogger(__name__)

__all__ = [
    "EXAMPLES_PER_CLASS",
    "SAMPLE_IMAGES",
    "SAMPLE_QUERIES",
    "WORST_CLASSES",
    "eval_folder",
    "misclassified_examples",
    "most_confused_pairs",
    "render_reports",
    "sample_indices",
    "save_classification",
    "save_retrieval",
]

PathLike = Union[str, os.PathLike]

WORST_CLASSES = 5  # classes whose mistakes report.html shows
EXAMPLES_PER_CLASS = 4  # misclassified thumbnails per such class
CONFUSED_PAIRS = 15  # rows of the most-confused-pairs table
SAMPLE_QUERIES = 8  # captions whose top images retrieval.html shows
SAMPLE_IMAGES = 6  # images whose top captions retrieval.html shows
TOP_SHOWN = 5  # retrieved items shown per query
THUMB_SIZE = 112  # longest side of a thumbnail, pixels
PREDICTIONS = "predictions.npz"


def eval_folder(output_dir: PathLike, record: Dict[str, Any]) -> Path:
    """Where one evaluation's predictions, thumbnails and plots live."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{record['dataset']}_{record['task']}").strip("_")
    return Path(output_dir) / name


# ----------------------------------------------------------------------------- selection (shared by save and render)


def sample_indices(n: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(n)`` (deterministic, first and last included)."""
    if n <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(np.int64))


def misclassified_examples(labels: np.ndarray, topk: np.ndarray, num_classes: int,
                           classes: int = WORST_CLASSES, per_class: int = EXAMPLES_PER_CLASS) -> Dict[int, List[int]]:
    """``{class: [sample, ...]}`` for the lowest-accuracy classes that have mistakes (worst first).

    Within a class the samples whose true class ranks lowest come first (the clearest mistakes),
    ties in dataset order.
    """
    predicted = topk[:, 0]
    acc, counts = plots.per_class_accuracy(labels, predicted, num_classes)
    wrong = predicted != labels
    worst = [int(c) for c in plots.per_class_order(acc)[::-1] if counts[c] > 0 and wrong[labels == c].any()]
    # rank of the true class in the saved top-k (k when it is not there)
    hit = topk == labels[:, None]
    true_rank = np.where(hit.any(axis=1), hit.argmax(axis=1), topk.shape[1])
    out: Dict[int, List[int]] = {}
    for c in worst[:classes]:
        idx = np.flatnonzero((labels == c) & wrong)
        idx = idx[np.lexsort((idx, -true_rank[idx]))]
        out[c] = [int(i) for i in idx[:per_class]]
    return out


def most_confused_pairs(labels: np.ndarray, predicted: np.ndarray, num_classes: int, top: int = CONFUSED_PAIRS):
    """``[(true, predicted, count, share of the true class), ...]`` by count, for true != predicted."""
    cm = plots.confusion_matrix(labels, predicted, num_classes)
    np.fill_diagonal(cm, 0)
    flat = np.flatnonzero(cm)
    order = flat[np.lexsort((flat, -cm.ravel()[flat]))][:top]
    totals = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    return [(int(i // num_classes), int(i % num_classes), int(cm.ravel()[i]),
             float(cm.ravel()[i] / max(totals[i // num_classes], 1))) for i in order]


def _retrieval_shown(rank: Dict[str, np.ndarray], text_to_image: np.ndarray, n_images: int):
    """(sampled captions, sampled images, images whose thumbnails the page needs)."""
    queries = sample_indices(len(text_to_image), SAMPLE_QUERIES)
    images = sample_indices(n_images, SAMPLE_IMAGES)
    needed = set(rank["t2i_topk"][queries, :TOP_SHOWN].ravel().tolist())
    needed |= set(text_to_image[queries].tolist()) | set(images.tolist())
    return queries, images, sorted(needed)


# ----------------------------------------------------------------------------- saving


def _original_image(dataset, index: int) -> Optional[Image.Image]:
    """The untransformed picture behind ``dataset[index]`` for the datasets paddlemix reads."""
    from .datasets import load_image

    if hasattr(dataset, "samples"):  # ImageFolderDataset
        return load_image(dataset.samples[index][0])
    if hasattr(dataset, "images") and isinstance(dataset.images, np.ndarray):  # CifarDataset
        return Image.fromarray(dataset.images[index], mode="RGB")
    if hasattr(dataset, "image_root") and hasattr(dataset, "images"):  # RetrievalDataset
        return load_image(Path(dataset.image_root) / dataset.images[index])
    if hasattr(dataset, "files") and hasattr(dataset, "root"):  # ImageListDataset
        return load_image(Path(dataset.root) / dataset.files[index])
    return None


def _sample_name(dataset, index: int) -> str:
    if hasattr(dataset, "samples"):
        root = getattr(dataset, "root", None)
        path = Path(dataset.samples[index][0])
        return str(path.relative_to(root)) if root is not None and Path(root) in path.parents else path.name
    if hasattr(dataset, "images") and not isinstance(dataset.images, np.ndarray):
        return str(dataset.images[index])
    return f"#{index}"


def _write_thumbs(folder: Path, dataset, indices: Sequence[int]) -> int:
    thumbs = folder / "thumbs"
    if thumbs.is_dir():  # a previous evaluation's pictures would show up under the wrong predictions
        shutil.rmtree(thumbs)
    thumbs.mkdir(parents=True)
    written = 0
    for i in indices:
        img = _original_image(dataset, int(i))
        if img is None:
            continue
        img = img.convert("RGB")
        img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BICUBIC)
        img.save(thumbs / f"{int(i):06d}.jpg", format="JPEG", quality=88)
        written += 1
    return written


def save_classification(output_dir: PathLike, record: Dict[str, Any], predictions: Dict[str, np.ndarray],
                        classnames: Sequence[str], dataset) -> Path:
    """Predictions and the thumbnails ``report.html`` shows for one zero-shot classification."""
    folder = eval_folder(output_dir, record)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(predictions["labels"], np.int64)
    topk = np.asarray(predictions["topk"], np.int64)
    np.savez_compressed(
        folder / PREDICTIONS,
        labels=labels,
        topk=topk,
        classnames=np.asarray([str(c) for c in classnames]),
        sample_names=np.asarray([_sample_name(dataset, i) for i in range(len(labels))]),
    )
    shown = misclassified_examples(labels, topk, len(classnames))
    _write_thumbs(folder, dataset, [i for idx in shown.values() for i in idx])
    return folder


def save_retrieval(output_dir: PathLike, record: Dict[str, Any], rankings: Dict[str, np.ndarray], dataset) -> Path:
    """Rankings, captions and the thumbnails ``retrieval.html`` shows for one retrieval evaluation."""
    folder = eval_folder(output_dir, record)
    folder.mkdir(parents=True, exist_ok=True)
    t2i = np.asarray(dataset.text_to_image, np.int64)
    np.savez_compressed(
        folder / PREDICTIONS,
        text_to_image=t2i,
        texts=np.asarray(list(dataset.texts)),
        images=np.asarray([str(p) for p in dataset.images]),
        **{k: np.asarray(v) for k, v in rankings.items()},
    )
    _, _, needed = _retrieval_shown(rankings, t2i, len(dataset))
    _write_thumbs(folder, dataset, needed)
    return folder


# ----------------------------------------------------------------------------- HTML pieces

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:20px;margin-top:36px;border-bottom:1px solid #ddd}
h3{font-size:16px;margin-top:24px}.meta{color:#666;font-size:13px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
figure{display:inline-block;margin:2px 6px 2px 0;text-align:center;font-size:11px;width:120px;vertical-align:top}
figure img,.noimg{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#fafafa;
 border:3px solid #ccc;display:block;margin:0 auto}
.noimg{line-height:96px;color:#999;font-size:10px}
figure.gt img{border-color:#2a9d3a}figure.bad img{border-color:#d04030}
.ok{color:#2a9d3a;font-weight:600}.no{color:#d04030}
ol.caps{margin:0;padding-left:22px}ol.caps li{margin:2px 0}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100.0 * float(value):.2f}%"


def _data_uri(path: Path, mime: str) -> Optional[str]:
    if not path.is_file():
        return None
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _plot_img(path: Path, alt: str) -> str:
    uri = _data_uri(path, "image/png")
    return f'<img class="plot" alt="{_e(alt)}" src="{uri}">' if uri else ""


def _figure(folder: Path, index: int, lines: Sequence[str], css: str = "", title: str = "") -> str:
    uri = _data_uri(folder / "thumbs" / f"{int(index):06d}.jpg", "image/jpeg")
    img = f'<img alt="{_e(title)}" title="{_e(title)}" src="{uri}">' if uri else '<div class="noimg">not saved</div>'
    caption = "<br>".join(lines)
    return f'<figure class="{css}">{img}<figcaption>{caption}</figcaption></figure>'


def _page(title: str, records: Sequence[Dict[str, Any]], body: List[str]) -> str:
    models = sorted({(r.get("model", ""), r.get("pretrained", "")) for r in records})
    meta = "; ".join(f"model {_e(m)}" + (f", weights {_e(p)}" if p else "") for m, p in models)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{_e(title)}</h1><p class=\"meta\">{meta}</p>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- classification report


def _classification_section(output_dir: Path, record: Dict[str, Any], written: List[Path]) -> str:
    folder = eval_folder(output_dir, record)
    name = record["dataset"]
    preds_file = folder / PREDICTIONS
    if not preds_file.is_file():
        return f"<h2>{_e(name)}</h2><p>No saved predictions in {_e(folder.name)}/; only the numbers above.</p>"
    with np.load(preds_file, allow_pickle=False) as z:
        labels, topk = z["labels"], z["topk"]
        classnames = [str(c) for c in z["classnames"]]
        sample_names = [str(s) for s in z["sample_names"]]
    n = len(classnames)
    predicted = topk[:, 0]
    acc, counts = plots.per_class_accuracy(labels, predicted, n)
    parts = [f'<h2 id="{_e(folder.name)}">{_e(name)}</h2>']

    written.append(plots.plot_per_class_accuracy(acc, counts, classnames, folder / "per_class_accuracy.png",
                                                 title=f"{name}: zero-shot top-1 accuracy per class"))
    parts.append(_plot_img(folder / "per_class_accuracy.png", "per-class accuracy"))
    cm = plots.confusion_matrix(labels, predicted, n)
    if n <= plots.CONFUSION_MAX_CLASSES:
        written.append(plots.plot_confusion(cm, classnames, folder / "confusion.png", title=f"{name}: confusion matrix"))
        parts.append(_plot_img(folder / "confusion.png", "confusion matrix"))

    pairs = most_confused_pairs(labels, predicted, n)
    pairs_csv = folder / "confused_pairs.csv"
    with open(pairs_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true_class", "predicted_class", "count", "share_of_true_class"])
        for t, p, c, s in most_confused_pairs(labels, predicted, n, top=n * n):
            w.writerow([classnames[t], classnames[p], c, f"{s:.4f}"])
    written.append(pairs_csv)
    parts.append(f"<h3>Most confused pairs</h3><p class=\"meta\">all pairs: {_e(folder.name)}/confused_pairs.csv</p>")
    if pairs:
        rows = "".join(f"<tr><td>{_e(classnames[t])}</td><td>{_e(classnames[p])}</td><td class=\"num\">{c}</td>"
                       f"<td class=\"num\">{100 * s:.1f}%</td></tr>" for t, p, c, s in pairs)
        parts.append('<table class="pairs"><tr><th>true class</th><th>predicted as</th><th>images</th>'
                     f"<th>share of the true class</th></tr>{rows}</table>")
    else:
        parts.append("<p>No mistakes.</p>")

    shown = misclassified_examples(labels, topk, n)
    parts.append("<h3>Worst classes: misclassified images</h3>")
    if shown:
        rows = []
        for c, idx in shown.items():
            figs = []
            for i in idx:
                hits = np.flatnonzero(topk[i] == labels[i])
                where = f"true class ranked #{hits[0] + 1}" if hits.size else f"true class not in top {topk.shape[1]}"
                figs.append(_figure(folder, i, [f'<span class="no">predicted: {_e(classnames[predicted[i]])}</span>',
                                                f"true: {_e(classnames[labels[i]])}", _e(where)],
                                    css="bad", title=sample_names[i]))
            rows.append(f'<tr><td><b>{_e(classnames[c])}</b><br>{100 * acc[c]:.0f}% of {int(counts[c])} correct</td>'
                        f'<td>{"".join(figs)}</td></tr>')
        parts.append('<table class="worst"><tr><th>class</th><th>misclassified images</th></tr>'
                     + "".join(rows) + "</table>")
    else:
        parts.append("<p>No misclassified images.</p>")
    return "\n".join(parts)


def _render_classification(output_dir: Path, records: Sequence[Dict[str, Any]], written: List[Path]) -> None:
    rows = []
    for r in records:
        m = r["metrics"]
        rows.append(f'<tr><td><a href="#{_e(eval_folder(output_dir, r).name)}">{_e(r["dataset"])}</a></td>'
                    f'<td class="num">{m.get("num_samples", "")}</td><td class="num">{m.get("num_classes", "")}</td>'
                    f'<td class="num">{_pct(m.get("acc1"))}</td><td class="num">{_pct(m.get("acc5"))}</td>'
                    f'<td class="num">{_pct(m.get("mean_per_class_recall"))}</td></tr>')
    body = ['<table class="summary"><tr><th>dataset</th><th>images</th><th>classes</th><th>top-1</th>'
            '<th>top-5</th><th>mean per-class recall</th></tr>' + "".join(rows) + "</table>"]
    body += [_classification_section(output_dir, r, written) for r in records]
    written.append(_write_text(output_dir / "report.html", _page("Zero-shot classification report", records, body)))


# ----------------------------------------------------------------------------- retrieval report


def _rank_note(rank: int, shown_at: np.ndarray, what: str) -> str:
    """Where the right answer ranks; ranks count equal scores against it, as recall@k does."""
    css = "ok" if rank < TOP_SHOWN else "no"
    note = f"{what} ranked #{rank + 1}"
    if shown_at.size and int(shown_at[0]) != rank:
        note += f" (shown at #{int(shown_at[0]) + 1}: items with an equal score count against it, as in recall@k)"
    return f'<span class="{css}">{note}</span>'


def _retrieval_section(output_dir: Path, record: Dict[str, Any], written: List[Path]) -> str:
    folder = eval_folder(output_dir, record)
    name = record["dataset"]
    parts = [f'<h2 id="{_e(folder.name)}">{_e(name)}</h2>']
    written.append(plots.plot_recall_at_k(record["metrics"], folder / "recall_at_k.png", title=f"{name}: recall@k"))
    parts.append(_plot_img(folder / "recall_at_k.png", "recall@k"))
    preds_file = folder / PREDICTIONS
    if not preds_file.is_file():
        parts.append(f"<p>No saved rankings in {_e(folder.name)}/.</p>")
        return "\n".join(parts)
    with np.load(preds_file, allow_pickle=False) as z:
        rank = {k: z[k] for k in z.files}
    t2i, texts = rank["text_to_image"], [str(t) for t in rank["texts"]]
    images = [str(p) for p in rank["images"]]
    queries, sampled_images, _ = _retrieval_shown(rank, t2i, len(images))

    rows = []
    for q in queries:
        gt = int(t2i[q])
        figs = []
        for pos, (j, s) in enumerate(zip(rank["t2i_topk"][q, :TOP_SHOWN], rank["t2i_scores"][q, :TOP_SHOWN])):
            is_gt = int(j) == gt
            mark = '<span class="ok">&#10003; ground truth</span>' if is_gt else "&nbsp;"
            figs.append(_figure(folder, int(j), [f"#{pos + 1} &middot; {s:.3f}", mark], css="gt" if is_gt else "",
                                title=images[int(j)]))
        shown_at = np.flatnonzero(rank["t2i_topk"][q, :TOP_SHOWN] == gt)
        note = _rank_note(int(rank["t2i_rank"][q]), shown_at, "ground truth")
        rows.append(f"<tr><td>{_e(texts[q])}<br><span class=\"meta\">{note}</span></td><td>{''.join(figs)}</td></tr>")
    parts.append(f"<h3>Text &rarr; image: top {TOP_SHOWN} images for {len(queries)} captions</h3>"
                 '<p class="meta">green frame: the image the caption was written for</p>'
                 '<table class="t2i"><tr><th>caption</th><th>retrieved images (rank &middot; cosine similarity)</th></tr>'
                 + "".join(rows) + "</table>")

    rows = []
    for i in sampled_images:
        items = []
        for j, s in zip(rank["i2t_topk"][i, :TOP_SHOWN], rank["i2t_scores"][i, :TOP_SHOWN]):
            ok = int(t2i[int(j)]) == int(i)
            mark = ' <span class="ok">&#10003;</span>' if ok else ""
            items.append(f"<li>{_e(texts[int(j)])} <span class=\"meta\">({s:.3f})</span>{mark}</li>")
        shown_at = np.flatnonzero(t2i[rank["i2t_topk"][i, :TOP_SHOWN]] == int(i))
        note = _rank_note(int(rank["i2t_rank"][i]), shown_at, "first correct caption")
        fig = _figure(folder, int(i), [_e(Path(images[i]).name)], title=images[i])
        rows.append(f'<tr><td>{fig}</td><td><ol class="caps">{"".join(items)}</ol><span class="meta">{note}</span></td></tr>')
    parts.append(f"<h3>Image &rarr; text: top {TOP_SHOWN} captions for {len(sampled_images)} images</h3>"
                 '<table class="i2t"><tr><th>image</th><th>retrieved captions (cosine similarity; &#10003; describes the image)</th></tr>'
                 + "".join(rows) + "</table>")
    return "\n".join(parts)


def _render_retrieval(output_dir: Path, records: Sequence[Dict[str, Any]], written: List[Path]) -> None:
    ks = sorted({int(k.split("@")[1]) for r in records for k in r["metrics"] if "_recall@" in k})
    head = "".join(f"<th>text&rarr;image R@{k}</th>" for k in ks) + "".join(f"<th>image&rarr;text R@{k}</th>" for k in ks)
    rows = []
    for r in records:
        m = r["metrics"]
        cells = "".join(f'<td class="num">{_pct(m.get(f"image_retrieval_recall@{k}"))}</td>' for k in ks)
        cells += "".join(f'<td class="num">{_pct(m.get(f"text_retrieval_recall@{k}"))}</td>' for k in ks)
        rows.append(f'<tr><td><a href="#{_e(eval_folder(output_dir, r).name)}">{_e(r["dataset"])}</a></td>'
                    f'<td class="num">{m.get("num_images", "")}</td><td class="num">{m.get("num_texts", "")}</td>'
                    f"{cells}</tr>")
    body = [f'<table class="summary"><tr><th>dataset</th><th>images</th><th>captions</th>{head}</tr>'
            + "".join(rows) + "</table>"]
    body += [_retrieval_section(output_dir, r, written) for r in records]
    written.append(_write_text(output_dir / "retrieval.html", _page("Zero-shot retrieval report", records, body)))


# ----------------------------------------------------------------------------- entry point


_RENDERERS: Dict[str, Callable[[Path, Sequence[Dict[str, Any]], List[Path]], None]] = {
    "zeroshot_classification": _render_classification,
    "zeroshot_retrieval": _render_retrieval,
}


def render_reports(output_dir: PathLike, records: Optional[Sequence[Dict[str, Any]]] = None) -> List[Path]:
    """Draw the plots and pages of ``records`` (default: every evaluation saved in ``output_dir``).

    Also ``train_curves.png`` when the folder holds a ``train_log.jsonl``. Returns the files written.
    """
    output_dir = Path(output_dir)
    if records is None:
        records = read_records(output_dir)
    written: List[Path] = []
    for task, render in _RENDERERS.items():
        mine = [r for r in records if r.get("task") == task]
        if mine:
            render(output_dir, mine, written)
    log = output_dir / "train_log.jsonl"
    if log.is_file():
        written.append(plots.plot_train_curves(log, output_dir / "train_curves.png"))
    for path in written:
        logger.info("wrote %s", path)
    return written
