"""Write PaddleMIX-made fixture directories for tests/test_paddlemix_legacy.py, with PaddleMIX's own classes.

Run with a PaddleMIX checkout (its ``paddlemix`` package, not this project's) first on the path::

    PYTHONPATH=/path/to/PaddleMIX python tools/gen_paddlemix_fixtures.py tests/fixtures/paddlemix_legacy

Each case is built by PaddleMIX's ``CLIP`` / ``EVACLIP`` from a config, every parameter re-drawn
with a fixed seed (so every weight matters), saved with PaddleMIX's ``save_pretrained``, and run
through its ``encode_image`` / ``encode_text`` (eval mode, ``normalize=False``) on the inputs of
the ``eva01`` case. Attention runs PaddleMIX's plain (``xattn=False``) path, which needs no GPU
kernel, so nothing of PaddleMIX is patched. Never imported by the tests.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle

CASES = {
    "clip_custom_text_gap": dict(
        cls="CLIP", notes="custom_text, global_average_pool (class token included), quick_gelu text, LayerScale",
        kwargs={"embed_dim": 32, "custom_text": True,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                               "mlp_ratio": 4.0, "global_average_pool": True, "ls_init_value": 0.1},
                "text_cfg": {"context_length": 77, "vocab_size": 1024, "width": 64, "heads": 2, "layers": 2,
                             "quick_gelu": True, "ls_init_value": 0.1}}),
    "eva02_class_token": dict(
        cls="EVACLIP", notes="EVA02 switches (RoPE, SwiGLU, sub-LN) with use_mean_pooling=False",
        kwargs={"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                               "mlp_ratio": 2.6667, "qkv_bias": True, "rope": True, "pt_hw_seq_len": 16,
                               "intp_freq": True, "naiveswiglu": True, "subln": True, "xattn": False,
                               "use_mean_pooling": False},
                "text_cfg": {"context_length": 77, "vocab_size": 1024, "width": 64, "heads": 2, "layers": 2}}),
    "eva_plain_mlp_subln": dict(
        # init_values (LayerScale) is left out: PaddleMIX's EVA Block passes an int shape to
        # create_parameter, which Paddle 3.3.1 rejects.
        cls="EVACLIP", notes="sub-LN with the plain GELU MLP (ffn_ln at nn.LayerNorm's eps), mean pooling "
                             "at PaddleMIX's default, text quick_gelu",
        kwargs={"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                               "mlp_ratio": 4.0, "qkv_bias": True, "subln": True, "xattn": False},
                "text_cfg": {"context_length": 77, "vocab_size": 1024, "width": 64, "heads": 2, "layers": 2,
                             "quick_gelu": True}}),
}


def _rerandomise(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            value = np.full(p.shape, np.log(1 / 0.07) + 0.1)
        elif len(p.shape) >= 2:
            value = rng.normal(0.0, 0.05, p.shape)
        elif name.endswith("weight") and ("ln" in name or "norm" in name):
            value = 1.0 + rng.normal(0.0, 0.05, p.shape)
        else:
            value = rng.normal(0.0, 0.05, p.shape)
        p.set_value(value.astype(np.float32))


def main(out_root: str) -> None:
    import paddlemix  # PaddleMIX's, from the checkout on PYTHONPATH
    from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker
    from paddlemix.models.clip.clip_model import CLIP, CLIPConfig
    from paddlemix.models.clip.eva_clip_model import EVACLIP, EVACLIPConfig

    tracker = get_rng_state_tracker()
    for seed_name, seed in (("global_seed", 1), ("local_seed", 2)):
        if seed_name not in tracker.states_:
            tracker.add(seed_name, seed)
    checkout = Path(paddlemix.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    inputs_file = Path(out_root) / "eva01" / "inputs.npz"
    inputs = dict(np.load(inputs_file))
    classes = {"CLIP": (CLIP, CLIPConfig), "EVACLIP": (EVACLIP, EVACLIPConfig)}
    for i, (case, spec) in enumerate(CASES.items()):
        model_cls, config_cls = classes[spec["cls"]]
        paddle.seed(100 + i)
        model = model_cls(config_cls(**json.loads(json.dumps(spec["kwargs"]))))
        _rerandomise(model, 1000 + i)
        model.eval()
        out = Path(out_root) / case
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        reloaded = model_cls.from_pretrained(str(out))
        reloaded.eval()
        with paddle.no_grad():
            image, text = paddle.to_tensor(inputs["image"]), paddle.to_tensor(inputs["text"])
            feats = {"image_features": model.encode_image(image, normalize=False).numpy(),
                     "text_features": model.encode_text(text, normalize=False).numpy()}
            again = (reloaded.encode_image(image, normalize=False).numpy(),
                     reloaded.encode_text(text, normalize=False).numpy())
        assert np.array_equal(again[0], feats["image_features"]) and np.array_equal(again[1], feats["text_features"])
        np.savez(out / "inputs.npz", **inputs)
        np.savez(out / "outputs.npz", **feats)
        meta = {"family": "paddlemix_legacy", "producer": f"PaddleMIX {spec['cls']}({spec['cls']}Config(**config_kwargs))",
                "paddlemix_commit": commit, "config_kwargs": spec["kwargs"], "notes": spec["notes"],
                "saved_with": "model.save_pretrained(dir); reloaded with from_pretrained(dir): identical outputs",
                "outputs": "encode_image(image, normalize=False), encode_text(text, normalize=False), model.eval()",
                "patches": [], "inputs": "copied from the eva01 case", "paddle": paddle.__version__,
                "generator": "tools/gen_paddlemix_fixtures.py"}
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(case, {k: v.shape for k, v in feats.items()})


if __name__ == "__main__":
    main(sys.argv[1])
