"""tools/demo_zeroshot.py (the demo's open_clip-only check): it scores the one-object scenes only, whose
label is the only true one, unless told to score every scene; and it imports nothing from powerclip."""

from __future__ import annotations

import ast
import json
import re
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from powerclip.export import export_open_clip
from powerclip.model import create_model, model_cfg_dict, preprocess_cfg
from tests.tiny import tiny_config

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import demo_zeroshot  # noqa: E402


def _objects_per_scene(split: Path) -> list[int]:
    """How many objects each scene of ``split`` holds, read from the shards' json records."""
    counts = []
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            counts += [len(json.load(tar.extractfile(m))["objects"]) for m in tar.getmembers()
                       if m.name.endswith(".json")]
    return counts


def _scored(out: str) -> tuple[int, int]:
    m = re.search(r": (\d+\.\d)% \((\d+)/(\d+), 95% CI (\d+\.\d)-(\d+\.\d)%\); chance 2\.9% \(35 classes\)", out)
    assert m, out
    acc, correct, total, low, high = float(m[1]), int(m[2]), int(m[3]), float(m[4]), float(m[5])
    # Wilson's interval, by its formula, around the printed share
    p, z = correct / total, 1.959963984540054
    centre, half = (p + z * z / (2 * total)), z * (p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5
    assert low == pytest.approx(100 * (centre - half) / (1 + z * z / total), abs=0.051)
    assert high == pytest.approx(100 * (centre + half) / (1 + z * z / total), abs=0.051)
    assert acc == pytest.approx(100 * p, abs=0.051)
    return correct, total


def test_demo_scores_the_one_object_scenes_only(synthetic_root, tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config()
    model = create_model(cfg.model).eval()
    export = export_open_clip(model, model_cfg_dict(cfg.model), preprocess_cfg(model), tmp_path / "export")
    counts = _objects_per_scene(synthetic_root / "heldout")
    assert 0 < counts.count(1) < len(counts)  # both kinds of scene are there

    assert demo_zeroshot.main(["--model", str(export), "--data", str(synthetic_root), "--split", "heldout"]) == 0
    out = capsys.readouterr().out
    assert "on heldout (one-object scenes)" in out
    correct, total = _scored(out)
    assert total == counts.count(1) and 0 <= correct <= total

    assert demo_zeroshot.main(["--model", str(export), "--data", str(synthetic_root), "--split", "heldout",
                               "--all-scenes"]) == 0
    assert _scored(capsys.readouterr().out)[1] == len(counts)


def test_demo_zeroshot_imports_nothing_from_powerclip():
    tree = ast.parse((TOOLS / "demo_zeroshot.py").read_text())
    modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    modules += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert modules and not [m for m in modules if m.split(".")[0] == "powerclip"]
