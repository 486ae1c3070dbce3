"""Tiny models the kernel tests run (2 layers, generated inputs)."""
import json

import paddle


def tiny_model(name: str, tmp_path, head_width: int):
    """A 2-layer CLIP (causal text mask; ``head_width`` 12 gives a scale that is not a power of two)
    or EVA02 (RoPE, SwiGLU MLP with a sub-LN, q/v biases) model, with an image and a text batch."""
    import paddlemix
    from paddlemix.zoo.registry import get_model_config

    if name == "clip":
        width = 4 * head_width
        cfg = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "patch_size": 8, "width": width, "layers": 2, "head_width": head_width},
               "text_cfg": {"context_length": 12, "vocab_size": 100, "width": width, "heads": 4, "layers": 2}}
    else:
        cfg = get_model_config("EVA02-CLIP-B-16")
        cfg["embed_dim"] = 32
        cfg["vision_cfg"].update(image_size=32, patch_size=8, width=64, layers=2, head_width=16, pt_hw_seq_len=4)
        cfg["text_cfg"].update(context_length=12, vocab_size=100, width=64, heads=4, layers=2)
    paddle.seed(0)
    cfg_file = tmp_path / "model.json"
    cfg_file.write_text(json.dumps(cfg))
    return paddlemix.create_model(str(cfg_file)), paddle.randn([2, 3, 32, 32]), paddle.randint(1, 99, [2, 12])
