"""Generate the README's model-zoo table from the registry (paddlemix/zoo/pretrained.json).

    python tools/gen_model_table.py           # rewrite the table between the markers in README.md
    python tools/gen_model_table.py --check   # exit 1 if README.md is out of date (CI)

The table is data, not prose: editing it by hand would let it drift from what
``paddlemix.list_pretrained()`` actually serves, so only the registry is edited.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "paddlemix" / "zoo" / "pretrained.json"
README = ROOT / "README.md"
START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
HEADING = "## Model zoo"


def _preprocess(entry: Dict[str, Any], presets: Dict[str, Any]) -> str:
    p = entry["preprocess"]
    p = presets[p] if isinstance(p, str) else p
    mean = {(0.48145466, 0.4578275, 0.40821073): "OpenAI", (0.5, 0.5, 0.5): "0.5",
            (0.485, 0.456, 0.406): "ImageNet"}.get(tuple(p["mean"]), str(p["mean"]))
    return f"{mean}, {p['interpolation']}, {p['resize_mode']}"


def _sources(entry: Dict[str, Any]) -> str:
    out = []
    if entry.get("paddlemix"):
        out.append(f"PaddleMIX `{entry['paddlemix']}`")
    if entry.get("hf"):
        out.append(f"HF `{entry['hf']['repo']}/{entry['hf']['file']}`")
    return "<br>".join(out)


def _number(value: Any, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _paddlemix_note(name: str) -> Optional[str]:
    """Where PaddleMIX's own classes would give other numbers than the entry (which follows the original release)."""
    if str(ROOT) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(ROOT))
    from paddlemix.zoo.pretrained import default_registry, paddlemix_numerics_note

    entry = default_registry().find(name)
    note = paddlemix_numerics_note(entry) if entry is not None else None
    return f"PaddleMIX numerics: {note}" if note else None


def render(registry: Dict[str, Any]) -> str:
    """The markdown between the markers: one table per family, in registry order."""
    presets = registry.get("preprocess", {})
    families: Dict[str, List[Dict[str, Any]]] = {}
    for entry in registry["models"]:
        families.setdefault(entry.get("family") or "Other", []).append(entry)
    lines = [
        f"Generated from `paddlemix/zoo/pretrained.json` by `tools/gen_model_table.py`; do not edit by hand. "
        f"{len(registry['models'])} pretrained models. Params and ImageNet-1k zero-shot top-1 are the published "
        "numbers (open_clip's benchmark tables unless a note says otherwise). Use a model by its name "
        "(`CLIP.from_pretrained(name)`, `create_model(f'paddlemix:{name}')`, or `create_model(name)` where the "
        "name is not also an architecture name) or as `create_model(arch, pretrained=tag)`. "
        "Every entry computes as its original release does (open_clip's or EVA-CLIP's code), also when its weights "
        "come from PaddleMIX's host; notes name the entries for which PaddleMIX's own classes compute otherwise.",
    ]
    notes = []
    for family, entries in families.items():
        lines += ["", f"### {family}", "",
                  "| name | arch | tag | params (M) | IN-1k top-1 | size | preprocess | dtype | sources |",
                  "|---|---|---|---:|---:|---:|---|---|---|"]
        for e in entries:
            mark = ""
            for note in (e.get("note"), _paddlemix_note(e["name"])):
                if note:
                    if note not in notes:
                        notes.append(note)
                    mark += f" [{notes.index(note) + 1}]"
            lines.append(
                f"| `{e['name']}`{mark} | `{e['arch']}` | `{e['tag']}` | {_number(e.get('params_m'), 2)} | "
                f"{_number(e.get('in1k_top1'), 2)} | {e['image_size']} | {_preprocess(e, presets)} | "
                f"{e.get('dtype', 'fp16')} | {_sources(e)} |"
            )
    if notes:
        lines += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def updated_readme(text: str, table: str) -> str:
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        return head + block + tail
    return text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md is not up to date")
    args = parser.parse_args(argv)
    registry = json.loads(REGISTRY.read_text(encoding="utf-8"))
    text = README.read_text(encoding="utf-8")
    new = updated_readme(text, render(registry))
    if args.check:
        if new != text:
            sys.stderr.write("README.md's model table is out of date; run python tools/gen_model_table.py\n")
            return 1
        return 0
    README.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
