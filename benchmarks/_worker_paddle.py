"""Benchmark worker for paddlemix (started by run_all.py; speaks benchmarks/_protocol.py).

By default the CPU environment of paddlemix._env is applied before Paddle is imported, exactly
as the example scripts do, so the numbers are those a user of the scripts gets. With
``--user-program`` it starts as the README's "Use" code does, ``import paddlemix`` then
``import paddle`` and nothing else (run_all.py then also clears the environment): what a user's
own program gets.
"""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--user-program" in sys.argv[1:]:
    import paddlemix  # noqa: F401  (the README's order: before paddle)
    import paddle  # noqa: F401
else:
    runpy.run_path(str(ROOT / "paddlemix" / "_env.py"), run_name="paddlemix_apply_cpu_env")

import os  # noqa: E402
import tempfile  # noqa: E402
from typing import Any, Dict  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from _protocol import Case, serve  # noqa: E402
from _inputs import image_batch, layer_norm_operands, matmul_operands, text_batch  # noqa: E402


def _model(case: Dict[str, Any]):
    from paddlemix.factory import create_model

    paddle.seed(case.get("seed", 0))
    return create_model(case["model"])


class Encode(Case):
    """``encode_image`` / ``encode_text`` of one batch: dynamic (each call under ``paddle.no_grad()``),
    ``inference_mode`` (every call inside one ``paddlemix.inference_mode(model)`` block, entered at
    set-up as a program around its work loop, as the README's Use code shows) or exported."""

    def __init__(self, case: Dict[str, Any]):
        model = _model(case)
        model.eval()
        tower = "image" if case["kind"] == "encode_image" else "text"
        if tower == "image":
            x = image_batch(case["batch"], model.image_size[0], case.get("seed", 0))
        else:
            x = text_batch(case["batch"], model.context_length, model.config.text.vocab_size, case.get("seed", 0))
        self.info = {"paddle": paddle.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                     "MKL_DEBUG_CPU_TYPE": os.environ.get("MKL_DEBUG_CPU_TYPE")}
        self._tmp = None
        self._block = None
        if case["mode"] == "inference_mode":
            from paddlemix import inference_mode

            encode = model.encode_image if tower == "image" else model.encode_text
            xt = paddle.to_tensor(x)
            self._block = inference_mode(model)
            self._block.__enter__()
            self._call = lambda: encode(xt)
        elif case["mode"] == "exported":
            from paddlemix.export import export_encoders
            from paddlemix.inference import ExportedCLIP

            self._tmp = tempfile.TemporaryDirectory(prefix="paddlemix-bench-")
            export_encoders(model, self._tmp.name, towers=[tower])
            exported = ExportedCLIP(self._tmp.name, onednn=case.get("onednn", False))
            fn = exported.encode_image if tower == "image" else exported.encode_text
            self._call = lambda: fn(x)
            with paddle.no_grad():
                ref = (model.encode_image if tower == "image" else model.encode_text)(paddle.to_tensor(x)).numpy()
            self.info["max_abs_diff_vs_dynamic"] = float(np.abs(ref - fn(x)).max())
            del model
        else:
            xt = paddle.to_tensor(x)
            encode = model.encode_image if tower == "image" else model.encode_text

            def call():
                with paddle.no_grad():
                    encode(xt)

            self._call = call

    def run(self) -> None:
        self._call()

    def close(self) -> None:
        if self._block is not None:
            self._block.__exit__(None, None, None)
        if self._tmp is not None:
            self._tmp.cleanup()


class TrainStep(Case):
    """Forward of both towers, CLIP loss, backward and an AdamW step (paddlemix's training parts)."""

    def __init__(self, case: Dict[str, Any]):
        from paddlemix.train.loss import ClipLoss
        from paddlemix.train.optim import build_optimizer

        self.model = _model(case)
        self.model.train()
        seed, batch = case.get("seed", 0), case["batch"]
        self.images = paddle.to_tensor(image_batch(batch, self.model.image_size[0], seed))
        self.texts = paddle.to_tensor(
            text_batch(batch, self.model.context_length, self.model.config.text.vocab_size, seed))
        self.loss = ClipLoss()
        self.opt = build_optimizer(self.model, "adamw", 1e-5, weight_decay=0.1)
        self.info = {"optimizer": type(self.opt).__name__}

    def run(self) -> None:
        image_features, text_features, scale = self.model(self.images, self.texts)
        loss = self.loss(image_features, text_features, scale)
        loss.backward()
        self.opt.step()
        self.opt.clear_grad()


class DataPipeline(Case):
    """Decode + eval transform of a folder of JPEGs through ``paddle.io.DataLoader`` workers (one epoch).

    Workers start anew each epoch, as in paddlemix's evaluation loaders: Paddle's persistent
    workers sleep 0.5 s at every epoch start (``_reset`` polls in 0.5 s steps), which would
    dominate a short epoch.
    """

    def __init__(self, case: Dict[str, Any]):
        from paddlemix.data.transforms import image_transform
        from paddlemix.eval.datasets import ImageFolderDataset

        dataset = ImageFolderDataset(case["image_dir"], transform=image_transform(case["size"], is_train=False))
        self.loader = paddle.io.DataLoader(dataset, batch_size=case["batch"], num_workers=case["workers"],
                                           shuffle=False, drop_last=False)
        self.info = {"images": len(dataset)}

    def run(self) -> None:
        for _ in self.loader:
            pass


class ZeroShot(Case):
    """paddlemix's zero-shot evaluation loop end to end (decode workers + model + logits), or the
    model alone on the same images already decoded (``variant="model"``)."""

    def __init__(self, case: Dict[str, Any]):
        from paddlemix.data.transforms import image_transform
        from paddlemix.eval.datasets import ImageFolderDataset
        from paddlemix.eval.zero_shot import zero_shot_predictions

        self.model = _model(case)
        self.model.eval()
        size = self.model.image_size[0]
        self.dataset = ImageFolderDataset(case["image_dir"], transform=image_transform(size, is_train=False))
        self.classifier = np.random.default_rng(0).standard_normal(
            [self.model.config.embed_dim, len(self.dataset.classes)]).astype(np.float32)
        self.batch, self.workers = case["batch"], case["workers"]
        self.variant = case["variant"]
        self._predict = zero_shot_predictions
        if self.variant == "model":
            images = np.stack([np.asarray(self.dataset[i][0]) for i in range(len(self.dataset))])
            self.batches = [paddle.to_tensor(images[i:i + self.batch]) for i in range(0, len(images), self.batch)]
        self.info = {"images": len(self.dataset)}

    def run(self) -> None:
        if self.variant == "e2e":
            self._predict(self.model, self.classifier, self.dataset, batch_size=self.batch,
                          num_workers=self.workers, progress=False)
            return
        with paddle.no_grad():
            for x in self.batches:
                features = paddle.nn.functional.normalize(self.model.encode_image(x), axis=-1).numpy()
                np.argsort(-(100.0 * features @ self.classifier), axis=1)


class Tokenizer(Case):
    """A fresh ``SimpleTokenizer`` (built outside the timing) tokenising all captions, cold cache."""

    def __init__(self, case: Dict[str, Any]):
        from bench_tokenizer import make_captions

        from paddlemix.data.tokenizer import SimpleTokenizer

        self.captions = make_captions(case["captions"], seed=case.get("seed", 0))
        self.make = SimpleTokenizer
        self.batch = case.get("tokenizer_batch", 256)
        self.tokenizer = None
        self.info = {"captions": self.captions}

    def prepare(self) -> None:
        self.tokenizer = self.make()

    def run(self) -> None:
        for i in range(0, len(self.captions), self.batch):
            self.tokenizer.batch_encode(self.captions[i:i + self.batch])


class LayerNorm(Case):
    """Residual add + LayerNorm forward and backward on [rows, cols]: the fused_ln operator, or
    Paddle's ``x + r`` then ``F.layer_norm`` (``variant="paddle"``)."""

    def __init__(self, case: Dict[str, Any]):
        from paddlemix import kernels
        from paddlemix.kernels import ops

        rows, cols = case["shape"]
        x, r, dy, ds, w, b = (paddle.to_tensor(a) for a in layer_norm_operands(rows, cols))
        for t in (x, r, w, b):
            t.stop_gradient = False
        if case["variant"] == "fused":
            status = kernels.status()
            if not status.available:
                raise RuntimeError(f"fused_ln operator unavailable: {status.detail}")

            def step():
                y, s, _, _ = ops.fused_ln(x, r, w, b, 1e-5, False)
                paddle.grad([y, s], [x, r, w, b], [dy, ds])

            self.info = {"op": status.origin}
        else:
            def step():
                s = x + r
                y = paddle.nn.functional.layer_norm(s, [cols], w, b, 1e-5)
                paddle.grad([y, s], [x, r, w, b], [dy, ds])

            self.info = {}
        self._step = step

    def run(self) -> None:
        self._step()


class Matmul(Case):
    """One fp32 ``paddle.matmul`` of shape [m, k] @ [k, n]."""

    def __init__(self, case: Dict[str, Any]):
        m, k, n = case["shape"]
        self.a, self.b = (paddle.to_tensor(a) for a in matmul_operands(m, k, n))
        self.info = {}

    def run(self) -> None:
        paddle.matmul(self.a, self.b)


SETUPS = {
    "matmul": Matmul,
    "encode_image": Encode,
    "encode_text": Encode,
    "train_step": TrainStep,
    "data_pipeline": DataPipeline,
    "zero_shot": ZeroShot,
    "tokenizer": Tokenizer,
    "layer_norm": LayerNorm,
}

if __name__ == "__main__":
    serve(SETUPS)
