"""Checks a run's config, data, evaluation sets, tokenizer, starting weights and run folder in seconds.

A wrong shard path, a missing annotation or an unwritable run folder otherwise shows only once
distributed init, the model and the DeepSpeed engine are built (minutes on a large model, or a job
that waited in a Slurm queue first). ``preflight`` reads what the run will read (the first samples
of each data source, through the training loader's own sample processor) without building the model
or touching the process group, and stops at the first problem with one line that names the config
key and the fix. ``powerclip check`` runs it (plus the Slurm checks of ``powerclip.launch.check``),
``powerclip train`` runs it on every rank before anything else, ``powerclip submit`` before queueing.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from powerclip.config import Config
from powerclip.errors import UserError

SAMPLES = 8  # samples of each source decoded in full (image, caption, every annotation in use)
INDEX_SAMPLES = 64  # samples whose region indices tell their base (0 or 1)
# bytes one parameter costs in a checkpoint: fp32 weights, Adam's two moments, and up to 4 more for
# the master copy / low-precision module weights DeepSpeed saves next to them
CHECKPOINT_BYTES_PER_PARAM = 16
EMA_BYTES_PER_PARAM = 4  # a DeGLA teacher, saved with every checkpoint


class CheckError(UserError, ValueError):
    """What stops the run, on one line naming the config key (or path) and the fix."""


@dataclass
class Report:
    """What passed (one line each) and what deserves attention without stopping the run."""

    passed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preflight(cfg: Config, say: Callable[[str], None] | None = None) -> Report:
    """Run every check; raises ``CheckError`` at the first failure. ``say`` gets each passed check.

    The checks that need neither torch nor open_clip run first (paths, the annotations in the first
    samples' json), so the common mistakes are reported before the seconds those imports take."""
    report = Report()

    def ok(line: str | None) -> None:
        if line:
            report.passed.append(line)
            if say is not None:
                say(line)

    ok(check_run_dir(cfg))
    for line in check_eval(cfg):
        ok(line)
    ok(check_pretrained(cfg))
    sources = [source_samples(cfg, i, report.warnings) for i in range(len(cfg.data.sources) or 1)]
    ok(check_tokenizer(cfg))
    for i, (url, samples, n_shards) in enumerate(sources):
        ok(check_decode(cfg, i, url, samples, n_shards, report.warnings))
    if len(cfg.data.sources) > 1 or any(s.upsampling_factors is not None for s in cfg.data.sources):
        ok(check_mix(cfg))
    ok(check_disk(cfg))
    return report


# ------------------------------------------------------------------------------ run folder
def _existing_ancestor(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_run_dir(cfg: Config) -> str:
    """``train.run_dir`` exists as a writable folder or can be created (nothing is created here)."""
    run_dir = Path(cfg.train.run_dir).absolute()
    probe = _existing_ancestor(run_dir)
    key = f"train.run_dir={cfg.train.run_dir}"
    if not probe.is_dir():
        raise CheckError(f"{key}: {probe} is a file, not a folder; choose another train.run_dir")
    try:  # a real write (an unnamed file, gone when closed): catches read-only mounts and ACLs
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise CheckError(f"{key}: cannot write in {probe} ({e.strerror}); choose a writable train.run_dir "
                         "or fix its permissions") from None
    for sub in ("checkpoints", "tb"):
        p = run_dir / sub
        if p.exists() and not os.access(p, os.W_OK | os.X_OK):
            raise CheckError(f"{key}: {p} is not writable; fix its permissions or choose another train.run_dir")
    return f"run folder {run_dir} is writable"


def checkpoint_bytes(cfg: Config) -> int:
    """Estimated size of one checkpoint of this config's model (parameters counted on the meta device)."""
    from powerclip.losses.composer import needs_teacher
    from powerclip.model.factory import model_cfg_dict, reference_model

    n = sum(p.numel() for p in reference_model(model_cfg_dict(cfg.model)).parameters())
    per = CHECKPOINT_BYTES_PER_PARAM + (EMA_BYTES_PER_PARAM if needs_teacher(cfg.loss) else 0)
    return n * per


def check_disk(cfg: Config) -> str:
    """Free space for ``checkpoint.keep_last`` checkpoints (those already in the run folder count as room)."""
    from powerclip.model.factory import ModelLoadError

    run_dir = Path(cfg.train.run_dir).absolute()
    try:
        one = checkpoint_bytes(cfg)
    except (ModelLoadError, TypeError, ValueError, KeyError) as e:
        raise CheckError(f"model: cannot build the configured model ({e}); fix model.name / model.config") from None
    ckpts = run_dir / "checkpoints"
    held = sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file()) if ckpts.is_dir() else 0
    need = max(0, cfg.checkpoint.keep_last * one - held)
    free = shutil.disk_usage(_existing_ancestor(run_dir)).free
    gb = 1024 ** 3
    if free < need:
        raise CheckError(f"train.run_dir={cfg.train.run_dir}: {free / gb:.1f} GiB free but checkpoint.keep_last="
                         f"{cfg.checkpoint.keep_last} checkpoints of this model take about {need / gb:.1f} GiB more "
                         f"({one / gb:.2f} GiB each); free space, lower checkpoint.keep_last or choose another "
                         "train.run_dir")
    return (f"disk: {free / gb:.1f} GiB free, {cfg.checkpoint.keep_last} checkpoints need about "
            f"{cfg.checkpoint.keep_last * one / gb:.2f} GiB")


# ------------------------------------------------------------------------ tokenizer, weights
def check_tokenizer(cfg: Config) -> str:
    from powerclip.data.text import build_tokenizer

    try:
        build_tokenizer(cfg.data.tokenizer, cfg.data.context_length)
    except (ValueError, OSError, RuntimeError) as e:
        msg = str(e) if str(e).startswith("data.tokenizer") else f"data.tokenizer={cfg.data.tokenizer!r}: {e}"
        raise CheckError(f"{msg}; fix data.tokenizer ('clip', or 'sentencepiece:PATH' of a model trained with "
                         "tools/train_tokenizer.py)") from None
    return f"tokenizer {cfg.data.tokenizer!r} loads"


def check_pretrained(cfg: Config) -> str | None:
    """``model.pretrained``: an existing weights file, export folder or run/checkpoint folder, or an
    open_clip pretrained tag of ``model.name`` (the weights are not fetched here)."""
    src = cfg.model.pretrained
    if not src:
        return None
    path = Path(src)
    key = f"model.pretrained={src!r}"
    if path.exists():
        if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise CheckError(f"{key}: expected a .safetensors/.bin/.pt/.pth weights file, an export folder or "
                             "a run folder")
        if not os.access(path, os.R_OK):
            raise CheckError(f"{key}: not readable; fix its permissions")
        return f"starting weights {path} exist"
    if cfg.model.name:
        import open_clip

        if open_clip.get_pretrained_cfg(cfg.model.name, src):
            return f"starting weights: open_clip tag {src!r} of {cfg.model.name}"
    raise CheckError(f"{key}: no such file or folder, and not an open_clip pretrained tag of "
                     f"{cfg.model.name!r}; fix the path")


# ------------------------------------------------------------------------------ evaluation
def check_eval(cfg: Config) -> list[str]:
    """Every ``eval.tasks`` root exists (the names were checked when the config loaded)."""
    out = []
    for i, spec in enumerate(cfg.eval.tasks):
        task, _, root = spec.partition(":")
        if not Path(root).exists():
            raise CheckError(f"eval.tasks[{i}]={spec!r}: {root} does not exist; fix the root, or drop the entry "
                             "(eval.tasks=[] eval.every_steps=0 evaluates nothing during training)")
        out.append(f"eval task {task} on {root}")
    return out


# ------------------------------------------------------------------------------------ data
# what the enabled losses read from a sample, and the tool that adds it
NEEDS = {
    "phrases": "tools/annotate_shards.py (parse-tree phrases)",
    "concepts": "tools/annotate_shards.py (concept noun phrases)",
    "negatives": "tools/make_negatives.py",
    "boxes": "tools/build_shards.py --boxes-col, or data.region_source=random",
    "patches": "PowerCLIP's published shards (samlens.npy + samcat.npy), or data.region_source=random",
}


def required_members(cfg: Config) -> dict[str, str]:
    """member -> the config setting that needs it."""
    d, need = cfg.data, {}
    if cfg.loss.powerset.weight > 0 and d.phrase_unit == "tree":
        need["phrases"] = f"loss.powerset.weight={cfg.loss.powerset.weight}"
    if d.concepts:
        need["concepts"] = "data.concepts=true"
    if d.num_negatives > 0:
        need["negatives"] = f"data.num_negatives={d.num_negatives}"
    if d.region_source == "precomputed":
        need["boxes"] = "data.region_source=precomputed"
    if d.region_source == "patches":
        need["patches"] = "data.region_source=patches"
    return need


def has_member(sample: dict, ann: dict, member: str) -> bool:
    if member == "phrases":
        return bool(ann.get("phrases")) or "njson" in sample
    if member == "patches":
        return "samlens.npy" in sample and "samcat.npy" in sample
    return bool(ann.get(member))


def _annotation(sample: dict) -> dict:
    import orjson

    try:
        ann = orjson.loads(sample["json"]) if "json" in sample else {}
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        return {}
    return ann if isinstance(ann, dict) else {}


def _first_samples(url: str, n: int) -> list[dict]:
    from powerclip.data.stream import ERROR_KEY, read_shard

    out = []
    for sample in read_shard(url):
        if ERROR_KEY in sample and sample[ERROR_KEY] in ("unreadable_shard", "truncated_tar", "empty_shard"):
            if not out:
                raise CheckError(f"{url}: {sample[ERROR_KEY].replace('_', ' ')} "
                                 f"({sample.get('__detail__', 'no sample')})")
            break
        out.append(sample)
        if len(out) >= n:
            break
    return out


def check_mix(cfg: Config) -> str:
    """The sources' weights or upsampling factors resolve to a mix this mode can run; the line gives each
    source's share of shard visits (and an epoch's shard count in epoch mode)."""
    from powerclip.data.mixing import MixingError, expand_parts, resolve_mix

    srcs = [(expand_parts(s.shards), s.weight, s.upsampling_factors) for s in cfg.data.sources]
    try:
        mix = resolve_mix(srcs, cfg.data.resampled)
    except MixingError as e:
        raise CheckError(str(e)) from None
    if cfg.data.resampled:
        total = sum(mix.weights)
        shares = ", ".join(f"[{i}] {100 * w / total:.1f} %" for i, w in enumerate(mix.weights))
        return f"data mix: shard visits per source {shares}"
    repeats = mix.repeats or (1,) * sum(len(u) for u in mix.urls)
    visits, at = [], 0
    for urls in mix.urls:
        visits.append(sum(repeats[at:at + len(urls)]))
        at += len(urls)
    shares = ", ".join(f"[{i}] {100 * v / sum(visits):.1f} %" for i, v in enumerate(visits))
    return f"data mix: an epoch visits {sum(visits)} shards (copies included); per source {shares}"


def source_samples(cfg: Config, i: int, warnings: list[str]) -> tuple[str, list[dict], int]:
    """Shards of ``data.sources[i]`` exist, its first samples carry what the enabled losses need and
    their patch regions' index base agrees with ``data.region_index_base``; returns (first shard, its
    first samples, number of shards). Reads json and .npy only: no torch."""
    key = f"data.sources[{i}].shards"
    if not cfg.data.sources:
        raise CheckError("data.sources is empty: give at least one, e.g. data.sources='[{shards: "
                         "\"/data/cc12m/cc12m-train-{0000..2175}.tar\"}]'")
    pattern = cfg.data.sources[i].shards
    if pattern in (None, "???", ""):
        raise CheckError(f"{key} is not set: give a shard pattern, e.g. /data/cc12m/cc12m-train-{{0000..2175}}.tar")
    from powerclip.data.stream import expand_shards

    urls = expand_shards(pattern)
    if not urls:
        raise CheckError(f"{key}={pattern!r} expands to no shard; fix the pattern")
    local = [u for u in urls if not (u.startswith("pipe:") or "://" in u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more of {len(urls)}" if len(missing) > 1 else ""
        raise CheckError(f"{key}={pattern!r}: shard not found: {missing[0]}{more}; fix the path or the brace "
                         "range (ls the folder for the real names)")
    first = urls[0]
    samples = _first_samples(first, max(SAMPLES, INDEX_SAMPLES if cfg.data.region_source == "patches" else 0))
    head = samples[:SAMPLES]
    for member, why in required_members(cfg).items():
        have = sum(has_member(s, _annotation(s), member) for s in head)
        if not have:
            raise CheckError(f"{key}: none of the first {len(head)} samples of {first} has {member}, which "
                             f"{why} needs; add them with {NEEDS[member]}")
        if have < len(head):
            warnings.append(f"{key}: {len(head) - have} of the first {len(head)} samples of {first} lack {member}")
    if cfg.data.region_source == "patches":
        check_index_base(cfg, key, first, samples)
    return first, samples, len(urls)


def check_decode(cfg: Config, i: int, first: str, samples: list[dict], n_shards: int, warnings: list[str]) -> str:
    """The first samples go through the training loader's own sample processor."""
    from powerclip.data.samples import CAPTION_ONLY, DataError, SampleProcessor

    key = f"data.sources[{i}].shards"
    head = samples[:SAMPLES]
    try:
        proc = SampleProcessor(cfg, train=True)
        results = [proc(dict(s), seed=k) for k, s in enumerate(head)]
    except DataError as e:
        raise CheckError(str(e)) from None
    skipped = Counter(r for r in results if isinstance(r, str))
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    if skipped and sum(skipped.values()) == len(results):
        raise CheckError(f"{key}: none of the first {len(results)} samples of {first} can be used ({reasons}); "
                         "inspect one with tools/show_sample.py")
    if skipped:
        warnings.append(f"{key}: {sum(skipped.values())} of the first {len(results)} samples of {first} are "
                        f"skipped ({reasons})")
    used = len(results) - sum(skipped.values())
    if "phrases" in required_members(cfg) and proc.dropped.get(CAPTION_ONLY, 0) == used:
        raise CheckError(f"{key}: no phrase of the first {used} samples of {first} could be placed in its "
                         f"caption ({', '.join(f'{k}={v}' for k, v in sorted(proc.dropped.items()))}); inspect one "
                         "with tools/show_sample.py, or re-parse the captions with tools/annotate_shards.py")
    return f"{key}: {n_shards} shards, the first {len(results)} samples of {first} decode"


def check_index_base(cfg: Config, key: str, url: str, samples: list[dict]) -> None:
    """The region indices of the first samples agree with ``data.region_index_base``."""
    from powerclip.data.published import IndexEvidence, PatchRegionError, read_patch_sets

    grid = cfg.data.region_grid
    if grid is None:
        from powerclip.data.geometry import model_geometry

        grid = model_geometry(cfg).grid
    ev = IndexEvidence()
    for s in samples:
        if "samlens.npy" in s and "samcat.npy" in s:
            try:
                ev.add(read_patch_sets(s["samlens.npy"], s["samcat.npy"])[1], grid)
            except PatchRegionError as e:
                raise CheckError(f"{url}: sample {s['__key__']!r}: {e}") from None
    if ev.samples < math.ceil(len(samples) / 2):
        raise CheckError(f"{key}: only {ev.samples} of the first {len(samples)} samples of {url} have regions; "
                         "too few to tell data.region_index_base, check the shards with tools/show_sample.py")
    base = ev.base(grid)
    said = cfg.data.region_index_base
    where = f"the region indices of the first {ev.samples} samples of {url}"
    if base is None:
        raise CheckError(f"data.region_grid={cfg.data.region_grid}: {where} fit no index base: {ev.describe(grid)}; "
                         "set data.region_grid to the grid they were made on")
    if base != said:
        raise CheckError(f"data.region_index_base={said} but {where} are {base}-based ({ev.describe(grid)}); "
                         f"set data.region_index_base={base}")
