"""Benchmark worker for the peer, open_clip on torch (started by run_all.py with the peer's Python).

Runs in an environment that has torch and open_clip_torch and never imports Paddle or paddlemix.
Inputs are generated with the same numpy seeds as the paddlemix worker, so both sides see the
same images and token ids.

torchvision: open_clip imports ``torchvision.transforms`` at module level. A torchvision wheel
built for another torch fails to import (``operator torchvision::nms does not exist``) while
registering fake kernels for its C++ ops; the transforms themselves are pure Python on PIL. If
that happens, the worker imports torchvision again with that one registration module replaced
by an empty one (see ``_import_torchvision``). No detection ops are used here.
"""
import logging
import os
import sys
import types
from typing import Any, Dict

from _protocol import Case, serve
from _inputs import image_batch, layer_norm_operands, matmul_operands, text_batch

logger = logging.getLogger("bench.peer")


def _import_torchvision() -> str:
    """Import torchvision, working around a C++ op mismatch with the installed torch; says which."""
    try:
        import torchvision  # noqa: F401
        return "as installed"
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401,F811
        return f"without its C++ op registrations ({exc})"


TORCHVISION = _import_torchvision()

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())


def _info() -> Dict[str, Any]:
    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "threads": torch.get_num_threads(),
            "torchvision": TORCHVISION}


def _model(case: Dict[str, Any]):
    torch.manual_seed(case.get("seed", 0))
    return open_clip.create_model(case["peer_model"])


class Encode(Case):
    def __init__(self, case: Dict[str, Any]):
        model = _model(case).eval()
        seed = case.get("seed", 0)
        if case["kind"] == "encode_image":
            size = model.visual.image_size
            size = size[0] if isinstance(size, (tuple, list)) else size
            x = torch.from_numpy(image_batch(case["batch"], int(size), seed))
            fn = model.encode_image
        else:
            x = torch.from_numpy(text_batch(case["batch"], model.context_length, model.vocab_size, seed))
            fn = model.encode_text

        # Where paddlemix runs inside paddlemix.inference_mode, torch's counterpart runs.
        guard = torch.inference_mode if case["mode"] == "inference_mode" else torch.no_grad

        def call():
            with guard():
                fn(x)

        self._call = call
        self.info = _info()

    def run(self) -> None:
        self._call()


class TrainStep(Case):
    def __init__(self, case: Dict[str, Any]):
        self.model = _model(case).train()
        seed, batch = case.get("seed", 0), case["batch"]
        size = self.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.images = torch.from_numpy(image_batch(batch, int(size), seed))
        self.texts = torch.from_numpy(text_batch(batch, self.model.context_length, self.model.vocab_size, seed))
        self.loss = open_clip.ClipLoss()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.1)
        self.info = _info()

    def run(self) -> None:
        out = self.model(self.images, self.texts)
        if isinstance(out, dict):
            out = (out["image_features"], out["text_features"], out["logit_scale"])
        loss = self.loss(*out[:3])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class _Folder(torch.utils.data.Dataset):
    """``root/<class>/<image>`` in sorted order, decoded as torchvision's default loader does."""

    def __init__(self, root: str, transform):
        from PIL import Image

        self._open = Image.open
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(root, c)))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = self._open(f).convert("RGB")
        return self.transform(img), label


class DataPipeline(Case):
    def __init__(self, case: Dict[str, Any]):
        transform = open_clip.image_transform(case["size"], is_train=False)
        dataset = _Folder(case["image_dir"], transform)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=case["batch"], num_workers=case["workers"],
                                                  shuffle=False)
        self.info = dict(_info(), images=len(dataset))

    def run(self) -> None:
        for _ in self.loader:
            pass


class Tokenizer(Case):
    def __init__(self, case: Dict[str, Any]):
        self.captions = case["captions_list"]
        self.batch = case.get("tokenizer_batch", 256)
        self.tokenizer = None
        self.info = _info()

    def prepare(self) -> None:
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer()

    def run(self) -> None:
        for i in range(0, len(self.captions), self.batch):
            self.tokenizer(self.captions[i:i + self.batch], 77)


class LayerNorm(Case):
    def __init__(self, case: Dict[str, Any]):
        rows, cols = case["shape"]
        x, r, dy, ds, w, b = (torch.from_numpy(a) for a in layer_norm_operands(rows, cols))
        for t in (x, r, w, b):
            t.requires_grad_(True)
        self._tensors = (x, r, w, b, dy, ds, cols)
        self.info = _info()

    def run(self) -> None:
        x, r, w, b, dy, ds, cols = self._tensors
        s = x + r
        y = F.layer_norm(s, [cols], w, b, 1e-5)
        torch.autograd.grad([y, s], [x, r, w, b], [dy, ds])


class Matmul(Case):
    def __init__(self, case: Dict[str, Any]):
        m, k, n = case["shape"]
        self.a, self.b = (torch.from_numpy(a) for a in matmul_operands(m, k, n))
        self.info = _info()

    def run(self) -> None:
        with torch.no_grad():
            torch.matmul(self.a, self.b)


SETUPS = {
    "matmul": Matmul,
    "encode_image": Encode,
    "encode_text": Encode,
    "train_step": TrainStep,
    "data_pipeline": DataPipeline,
    "tokenizer": Tokenizer,
    "layer_norm": LayerNorm,
}

if __name__ == "__main__":
    serve(SETUPS)
