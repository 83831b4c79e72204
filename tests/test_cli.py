"""The ``powerclip`` command as a user meets it: expected failures in one line (``--debug`` for the
traceback), no DeepSpeed chatter on CPU, ``--help`` without torch, ``--version``, ``config show``,
and invalid key combinations refused when the config is loaded.

Run as real subprocesses: what is asserted is what a terminal shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from powerclip.cli import SUBCOMMANDS
from powerclip.config import ConfigError, load_config, to_yaml
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
TIMEOUT = 300  # a command that loads torch takes seconds on an idle machine, far more under load


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "powerclip", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT, env=env)


def _one_line(r: subprocess.CompletedProcess, prefix: str, *needles: str) -> str:
    """The failure was printed as exactly one line on stderr, starting ``prefix``."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback, no DeepSpeed accelerator warning
    assert lines[0].startswith(prefix), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------- fast and quiet
HEAVY = ("torch", "deepspeed", "open_clip")


@pytest.mark.parametrize("argv", [[]] + [[name] for name in SUBCOMMANDS] + [["--debug", "export"]],
                         ids=lambda a: " ".join(a) or "top")
def test_help_imports_no_torch(argv: list[str]):
    """Every ``--help`` answers without torch, DeepSpeed or open_clip (each costs seconds to import):
    counted as the heavy modules loaded, not timed."""
    code = ("import sys\nfrom powerclip.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    r = subprocess.run([sys.executable, "-c", code, *argv, "--help"], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "usage: powerclip" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-300:]
    if argv and argv[-1] == "eval":  # the task table still reaches the help (read without importing torch)
        assert "sugar_crepe" in r.stdout and "winoground" in r.stdout


def test_version():
    import powerclip

    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"powerclip {powerclip.__version__}"


def test_config_show_prints_the_resolved_config():
    r = _run("config", "show", "-c", TINY, "train.steps=7", "optim.lr=0.002")
    assert r.returncode == 0, r.stderr
    assert r.stdout == to_yaml(load_config(TINY, ["train.steps=7", "optim.lr=0.002"]))
    shown = yaml.safe_load(r.stdout)
    assert shown["train"]["steps"] == 7 and shown["optim"]["lr"] == 0.002
    assert "checkpoint" in shown and "keep_last" in shown["checkpoint"]  # defaults too, not just the preset
    _one_line(_run("config", "show", "-c", TINY, "train.stepz=7"), "powerclip config: error:", "train.stepz")


def test_config_error_is_one_line_without_deepspeed_warning():
    # train imports DeepSpeed's logger before it reads the config: the CPU fallback warning stays quiet
    _one_line(_run("train", "-c", TINY, "bogus.key=1"), "powerclip train:", "bogus.key")


# ------------------------------------------------------------------------ expected failures
def _broken_run(root: Path) -> Path:
    run = root / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000001")
    (run / "config.yaml").write_text("model:\n  name: ViT-B-32\ntrain: [steps: 3\n")
    return run


def test_damaged_run_config_names_the_file_and_debug_shows_the_traceback(tmp_path: Path):
    run = _broken_run(tmp_path)
    cfg = run / "config.yaml"
    line = _one_line(_run("export", str(run), "--out", str(tmp_path / "exp")), "powerclip export: error:",
                     f"{cfg}: not valid YAML", "line 4")
    assert "fix the file" in line
    assert not (tmp_path / "exp").exists()
    for argv in (["--debug", "export"], ["export", "--debug"]):
        r = _run(*argv, str(run), "--out", str(tmp_path / "exp"))
        assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr, r.stderr
        assert "ConfigError" in r.stderr
    r = _run("export", str(run), "--out", str(tmp_path / "exp"), env={**_env(), "POWERCLIP_DEBUG": "1"})
    assert "Traceback (most recent call last)" in r.stderr
    # the same file given to train/config: the same one line
    _one_line(_run("config", "show", "-c", str(cfg)), "powerclip config: error:", f"{cfg}: not valid YAML")


def _env() -> dict:
    import os

    return dict(os.environ)


def test_config_path_that_is_a_folder_is_one_line(tmp_path: Path):
    _one_line(_run("config", "show", "-c", str(tmp_path)), "powerclip config: error:", str(tmp_path), "YAML file")


def test_eval_with_a_missing_image_is_one_line(tmp_path: Path):
    from tests.test_eval_support import make_export, write_winoground

    model = make_export(tmp_path / "m")
    data = write_winoground(tmp_path / "wino")
    gone = data / "images" / "ex_1_img_0.png"
    gone.unlink()
    _one_line(_run("eval", "--model", str(model), "--task", "winoground", "--data", str(data)),
              "powerclip eval: error:", "not found", str(gone))


# -------------------------------------------------------------------- combinations at load time
def test_invalid_combinations_are_refused_at_load_naming_the_keys():
    with pytest.raises(ConfigError, match=r"train\.compile=true .* train\.zero_stage=3"):
        tiny_config(["train.compile=true", "train.zero_stage=3"])
    tiny_config(["train.compile=true", "train.zero_stage=2"])  # fine below ZeRO-3
    with pytest.raises(ConfigError, match=r"loss\.global_loss=siglip needs a logit bias.*model\.init_logit_bias"):
        tiny_config(["loss.global_loss=siglip"])
    with pytest.raises(ConfigError, match=r"loss\.concept\.form=sigmoid needs a logit bias"):
        tiny_config(["loss.concept.npc_weight=1", "loss.concept.form=sigmoid"])
    assert tiny_config(["loss.global_loss=siglip", "model.init_logit_bias=-10"]).model.init_logit_bias == -10
    # a built-in SigLIP config brings its own bias (read from open_clip's model_configs, no import)
    assert load_config(None, ["model.name=ViT-B-16-SigLIP", "data.context_length=64", "loss.global_loss=siglip"]).loss.global_loss == "siglip"
    with pytest.raises(ConfigError, match="needs a logit bias"):
        load_config(None, ["model.name=ViT-B-32", "loss.global_loss=siglip"])


def test_every_preset_cited_in_the_code_exists():
    """Docstrings and help texts that show a command name presets that exist."""
    cited = set()
    for path in [*(ROOT / "powerclip").rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        cited |= {m for m in re.findall(r"configs/[\w.-]+\.yaml", path.read_text())}
    assert cited and all((ROOT / c).is_file() for c in cited), sorted(c for c in cited if not (ROOT / c).is_file())


@pytest.mark.parametrize("tool", ["make_synthetic", "build_shards"])
def test_shard_tool_os_error_is_one_line_with_the_path_and_the_fix(tool: str, tmp_path: Path):
    """A shard tool whose --out lies under a regular file (an OSError, as a full or read-only disk is):
    one line naming the path and the fix, exit 2, no traceback."""
    from PIL import Image

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "out"
    images = tmp_path / "images"  # one valid input sample for build_shards
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(images / "a.png")
    (images / "a.txt").write_text("a red square")
    args = {"make_synthetic": ["--out", str(out), "--train-shards", "1", "--per-shard", "4"],
            "build_shards": [str(images), "--out", str(out), "--parser", "rule"]}[tool]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and str(blocker) in lines[0] and "(" in lines[0], r.stderr


def test_each_environment_builds_deepspeeds_op_in_its_own_folder(tmp_path):
    """Importing powerclip points torch's extension folder into this environment (two venvs sharing
    ~/.cache/torch_extensions rebuild DeepSpeed's comm op in turn, stalling a rank before the
    rendezvous), and leaves a folder the user chose alone."""
    import os

    code = "import os, powerclip; print(os.environ.get('TORCH_EXTENSIONS_DIR'))"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == os.path.join(sys.prefix, "torch_extensions")
    chosen = str(tmp_path / "ext")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "TORCH_EXTENSIONS_DIR": chosen},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == chosen


def test_each_environment_builds_with_its_own_ninja(tmp_path):
    """The build's ninja is this environment's whether it was activated or not: a plain
    ``.venv/bin/python`` found the system's, whose build-log version differs, and rebuilt DeepSpeed's
    op after an activated run had built it (and back)."""
    import os
    import shutil

    own = os.path.join(sys.prefix, "bin", "ninja")
    if not os.path.isfile(own):
        pytest.skip("this environment has no ninja of its own")
    code = "import os, shutil, powerclip; print(shutil.which('ninja')); print(os.environ['PATH'])"
    system = os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"])  # not activated: no venv bin on PATH
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PATH": system}, capture_output=True,
                         text=True, timeout=120)
    which, path = out.stdout.split("\n")[:2]
    assert which == own and path == os.path.join(sys.prefix, "bin") + os.pathsep + system, out
    activated = os.path.join(sys.prefix, "bin") + os.pathsep + system
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PATH": activated}, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split("\n")[1] == activated  # already first: PATH left as it is
    assert shutil.which("ninja", path=system) != own  # without it: the system's ninja, or none


def test_open_clip_under_powerclip_leaves_wandb_unimported_and_tmp_clean(tmp_path):
    """timm (under open_clip) imports wandb when installed: over a second per process, and two temporary
    folders that a rank ending with ``os._exit`` left in /tmp. Importing powerclip first hides wandb from
    that one timm module only: wandb itself still imports, and then for timm too."""
    import os

    pytest.importorskip("wandb")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = ("import os, sys, powerclip, open_clip, timm.utils.summary as s\n"
            "print('wandb' in sys.modules, hasattr(s, 'wandb'), flush=True)\n"
            "os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(scratch)},
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]
    assert [p.name for p in scratch.iterdir() if "wandb" in p.name] == []  # (torch keeps its inductor cache there)
    code = ("import sys, wandb, powerclip, open_clip, timm.utils.summary as s\n"
            "print(hasattr(s, 'wandb'), sys.modules['wandb'] is wandb)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(scratch)},
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
