"""``powerclip check`` and the same checks at the start of ``train`` and ``submit``: the common mistakes
(a wrong shard path, an unknown eval task, a missing annotation, an unwritable run folder) fail with
one line naming the key and the fix, before torch is even imported (what makes them take well under
a second rather than the minutes a model and DeepSpeed engine take), and train stops before it
builds anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from powerclip.cli import main as cli_main
from tests import published as pub
from tests.tiny import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in list(env):  # a plain single process, whatever earlier tests left in os.environ
        if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or k.startswith("SLURM_"):
            env.pop(k)
    return env


def _config(tmp_path: Path, shards: str, **extra) -> Path:
    cfg = {"data": {"sources": [{"shards": shards}], "batch_size": 4, "workers": 0},
           "model": {"config": tiny_model_config()}, "train": {"run_dir": str(tmp_path / "run"), "steps": 2}}
    for key, value in extra.items():
        section, name = key.split("__")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# the check, in a fresh interpreter that reports afterwards whether torch/open_clip were imported
PROBE = ("import sys; from powerclip.cli import main; rc = main(sys.argv[1:]); "
         "print('IMPORTED', 'torch' in sys.modules, 'open_clip' in sys.modules); sys.exit(rc)")


def _mistakes(tmp_path: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (overrides, start of the one error line, its end: the fix)."""
    good = pub.write_shard(tmp_path / "pc" / "cc12m-train-0000.tar", n=8)
    plain = pub.write_shard(tmp_path / "plain" / "cc12m-train-0000.tar", n=8, with_njson=False)
    one_based = pub.write_shard(tmp_path / "b1" / "cc12m-train-0000.tar", n=8, base=1)
    (tmp_path / "file").write_text("x")
    src = f'data.sources=[{{shards: "{tmp_path}/pc/cc12m-train-{{0000..0001}}.tar"}}]'
    return {
        "wrong shard path": ([src], f"data.sources[0].shards='{tmp_path}/pc/cc12m-train-{{0000..0001}}.tar': "
                                    f"shard not found: {tmp_path}/pc/cc12m-train-0001.tar",
                             "fix the path or the brace range (ls the folder for the real names)"),
        "unknown eval task": ([f"data.sources=[{{shards: {good}}}]", f'eval.tasks=["sugarcrepe:{tmp_path}"]'],
                              f"eval.tasks[0]='sugarcrepe:{tmp_path}': unknown eval task 'sugarcrepe'; valid tasks: ",
                              "sugar_crepe, aro, valse, winoground, synthetic"),
        "missing annotation": ([f"data.sources=[{{shards: {plain}}}]", "loss.powerset.weight=0.2"],
                               f"data.sources[0].shards: none of the first 8 samples of {plain} has phrases, "
                               "which loss.powerset.weight=0.2 needs",
                               "add them with tools/annotate_shards.py (parse-tree phrases)"),
        "wrong region index base": ([f"data.sources=[{{shards: {one_based}}}]", "data.region_source=patches"],
                                    "data.region_index_base=0 but the region indices of the first 8 samples of "
                                    f"{one_based} are 1-based (an index equals 196",
                                    "set data.region_index_base=1"),
        "unwritable run folder": ([f"data.sources=[{{shards: {good}}}]", f"train.run_dir={tmp_path}/file/run"],
                                  f"train.run_dir={tmp_path}/file/run: {tmp_path}/file is a file, not a folder",
                                  "choose another train.run_dir"),
    }


@pytest.mark.parametrize("mistake", ["wrong shard path", "unknown eval task", "missing annotation",
                                     "wrong region index base", "unwritable run folder"])
def test_common_mistakes_fail_in_one_line_before_torch_is_imported(tmp_path, mistake):
    overrides, start, fix = _mistakes(tmp_path)[mistake]
    config = _config(tmp_path, "unused.tar")
    proc = subprocess.run([sys.executable, "-c", PROBE, "check", "-c", str(config), *overrides], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"powerclip check: error: {start}"), lines[0]
    assert lines[0].endswith(fix), lines[0]
    assert "IMPORTED False False" in proc.stdout  # the cheap checks run first: no torch, no open_clip
    assert not (tmp_path / "run").exists()


def test_train_stops_before_distributed_init_and_the_model(tmp_path):
    config = _config(tmp_path, f"{tmp_path}/missing/{{00000..00003}}.tar")
    proc = subprocess.run([sys.executable, "-m", "powerclip", "train", "-c", str(config)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("powerclip train:")]
    assert errors == [f"powerclip train: error: data.sources[0].shards='{tmp_path}/missing/{{00000..00003}}.tar': "
                      f"shard not found: {tmp_path}/missing/00000.tar and 3 more of 4; fix the path or the brace "
                      "range (ls the folder for the real names)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "DeepSpeed info" not in proc.stderr
    assert not (tmp_path / "run").exists()  # no lock, no config.yaml, no checkpoint: nothing was built


def test_a_good_config_passes_every_check(tmp_path, synthetic_root, capsys):
    shards = f"{synthetic_root}/train/{{00000..00001}}.tar"
    config = _config(tmp_path, shards, eval__tasks=[f"synthetic:{synthetic_root}"], eval__every_steps=1)
    assert cli_main(["check", "-c", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: run folder {tmp_path / 'run'} is writable"
    assert f"ok: eval task synthetic on {synthetic_root}" in out
    assert "ok: tokenizer 'clip' loads" in out
    assert f"ok: data.sources[0].shards: 2 shards, the first 8 samples of {synthetic_root}/train/00000.tar decode" in out
    assert out[-2].startswith("ok: disk: ") and out[-1].startswith("powerclip check: all checks passed in ")
    assert not (tmp_path / "run").exists()  # the check writes nothing


@pytest.mark.parametrize("override, message", [
    ("model.pretrained={tmp}/nope.safetensors", "model.pretrained='{tmp}/nope.safetensors': no such file or folder"),
    ('eval.tasks=["sugar_crepe:{tmp}/sc"]', "eval.tasks[0]='sugar_crepe:{tmp}/sc': {tmp}/sc does not exist; fix the root"),
    ("checkpoint.keep_last=100000000", "train.run_dir={tmp}/run: "),
    ("data.tokenizer=sentencepiece:{tmp}/tok.model", "data.tokenizer: sentencepiece model not found: "
                                                     "{tmp}/tok.model; fix data.tokenizer"),
    ("data.num_negatives=2", "data.sources[0].shards: none of the first 8 samples of {tmp}/pc/s.tar has negatives, "
                             "which data.num_negatives=2 needs; add them with tools/make_negatives.py"),
])
def test_other_problems_name_their_key(tmp_path, capsys, override, message):
    shard = pub.write_shard(tmp_path / "pc" / "s.tar", n=8)
    config = _config(tmp_path, str(shard))
    assert cli_main(["check", "-c", str(config), override.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("powerclip check: error: " + message.format(tmp=tmp_path)), err
    assert "\n" not in err
    if "keep_last" in override:
        assert "checkpoint.keep_last=100000000 checkpoints of this model take about" in err


def test_submit_checks_before_queueing_anything(tmp_path, capsys):
    config = _config(tmp_path, f"{tmp_path}/missing/{{0000..0001}}.tar")
    assert cli_main(["submit", "-c", str(config), "--cluster", "local"]) == 2
    assert "shard not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no config.yaml, no submitit folder


def test_slurm_partition_and_account_are_checked_where_slurm_answers(tmp_path, monkeypatch):
    """sinfo/sacctmgr stand-ins on PATH (the real ones need the shared cluster, see test_slurm.py)."""
    from powerclip.config import load_config
    from powerclip.launch.check import SlurmCheckError, check_slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'debug\\ngpu\\n'\n")
    (bin_dir / "sacctmgr").write_text("#!/bin/sh\nprintf 'proj_a\\n'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = load_config(None, ["model.name=ViT-B-32", "slurm.partition=gpu", "slurm.account=proj_a"])
    assert check_slurm(cfg) == ["slurm.partition=gpu exists", "slurm.account=proj_a is yours"]
    with pytest.raises(SlurmCheckError, match=r"slurm.partition='gpus' is not a partition of this cluster \(sinfo "
                                              r"lists debug, gpu\); pass --partition or set slurm.partition"):
        check_slurm(load_config(None, ["model.name=ViT-B-32", "slurm.partition=gpus"]))
    with pytest.raises(SlurmCheckError, match=r"slurm.account='proj_b' is not one of your Slurm accounts"):
        check_slurm(load_config(None, ["model.name=ViT-B-32", "slurm.account=proj_b"]))


# ------------------------------------------------------------------------------ evaluation tasks
def test_eval_task_names_are_a_closed_list_checked_at_load():
    from powerclip.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]='sugarcrepe:/x': unknown eval task 'sugarcrepe'; "
                                          r"valid tasks: zeroshot_classification, .*, synthetic"):
        load_config(None, ["model.name=ViT-B-32", 'eval.tasks=["sugarcrepe:/x"]'])
    with pytest.raises(ConfigError, match=r"unknown part 'swap_atts' of eval task 'sugar_crepe'; valid parts: add_att"):
        load_config(None, ["model.name=ViT-B-32", 'eval.tasks=["sugar_crepe/swap_atts:/x"]'])
    load_config(None, ["model.name=ViT-B-32", 'eval.tasks=["sugar_crepe/swap_att:/x", "valse/counting-hard:/v"]'])
    with pytest.raises(ConfigError, match=r"eval.every_steps=100 but eval.tasks is empty, so nothing would be "
                                          r"evaluated; .* or set eval.every_steps=0"):
        load_config(None, ["model.name=ViT-B-32", "eval.every_steps=100"])


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_presets_that_evaluate_periodically_list_their_tasks(preset):
    from powerclip.config import load_config

    cfg = load_config(ROOT / "configs" / preset, ["data.sources=[{shards: x.tar}]", "model.pretrained=null",
                                                  "loss.degla.require_pretrained=false"])
    assert cfg.eval.every_steps == 0 or cfg.eval.tasks


def test_eval_cli_typo_is_one_line_before_the_model_loads(tmp_path, capsys):
    assert cli_main(["eval", "--model", str(tmp_path / "no_model"), "--task", "sugarcrepe", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("powerclip eval: error: --task sugarcrepe: unknown eval task 'sugarcrepe'; valid tasks: "
                   "zeroshot_classification, zeroshot_retrieval, wds, sugar_crepe, aro, valse, winoground, synthetic")


def test_eval_out_file_holds_every_dataset_and_out_dir_one_file_each(tmp_path, synthetic_root, capsys):
    """Through the command: a tiny export evaluated on the synthetic benchmark (several datasets)."""
    import torch

    from powerclip.export import export_open_clip
    from powerclip.model.factory import create_model, model_cfg_dict, preprocess_cfg, reference_model
    from tests.tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config()
    model_cfg = model_cfg_dict(cfg.model)
    export = export_open_clip(create_model(cfg.model), model_cfg, preprocess_cfg(reference_model(model_cfg)),
                              tmp_path / "export")
    args = ["eval", "--model", str(export), "--task", "synthetic", "--data", str(synthetic_root), "--batch-size", "16"]
    assert cli_main([*args, "--out", str(tmp_path / "results.json")]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    datasets = [r["dataset"] for r in records]
    assert len(datasets) > 2 and "synthetic" in datasets and "synthetic/retrieval" in datasets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "results.json"]
    assert cli_main([*args, "--out", str(tmp_path / "dir")]) == 0
    files = sorted((tmp_path / "dir").glob("*.json"))
    assert sorted(json.loads(f.read_text())["dataset"] for f in files) == sorted(datasets)
    capsys.readouterr()
