#!/usr/bin/env python
"""One-command check of powerclip's CUDA path: correctness first, then speed (``tools/gpu_check.sh``).

    python tools/gpu_check.py                     # every section, on the GPU
    python tools/gpu_check.py --only zero,bench   # a rerun of the sections that failed
    python tools/gpu_check.py --cpu-smoke         # every section at toy size on CPU (CI)

Sections, cheapest correctness checks first (each in a fresh subprocess, timed, selectable):

* ``numerics``: the powerset (B=256, M=10, K=16, D=512) and XAC (T=196, D=768, ~3 concepts per image)
  scores in fp32 with TF32 on and off against a float64 reference, as an error relative to the
  powerset margin delta (an error that large flips hinge decisions).
* ``zero``: the tiny config in bf16 and fp16 under ZeRO 2 and 3, and in amp_bf16 / amp_fp16 under ZeRO 0
  (half weights at ZeRO-0 are refused), for a few steps; a second run resumes from the mid-run
  checkpoint and must reproduce every later loss exactly (deterministic kernels on).
* ``degla``: the DeGLA tiny config with its EMA teacher, checkpointed and resumed the same way.
* ``syncs``: powerset + concept training steps under ``torch.cuda.set_sync_debug_mode("warn")``: host
  synchronisations per step and where they come from.
* ``bench``: ``tools/bench_breakdown.py``, where the step time goes (<= 8 minutes on its own,
  ``--only bench``): model-only forward / backward / optimizer per precision mode, ZeRO-1 and
  ``train.compile`` next to open_clip_train's step, both trainers' loaders on CC12M-sized JPEGs, both
  trainers end to end, and a torch.profiler trace of one step; its table and trace land in OUT.

Each section's result is appended to ``OUT/gpu_check.jsonl`` and the table rewritten to
``OUT/gpu_check.md`` as soon as it ends (OUT = ``--out-dir``, else ``$OUT``, else ``runs/gpu_check``),
so a run cut short still leaves what it measured. The final table is printed and, on a GPU, appended
to BENCHMARKS.md with the GPU's name. Any failure exits non-zero after the table, with its traceback in
the log. A wall-clock budget (``--budget-s``) skips the sections that no longer fit, saying so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("numerics", "zero", "degla", "syncs", "bench")
# seconds each section needs at least on the GPU (skipped when the budget has less left)
MIN_SECONDS = {"numerics": 20, "zero": 70, "degla": 35, "syncs": 30, "bench": 150}
BENCH_MAX_S = 480.0  # tools/bench_breakdown.py's own budget on a GPU (it skips, and says, what does not fit)

DETERMINISTIC = ("zero", "degla")  # sections whose resume equality needs deterministic kernels
Row = list  # [measurement, value, verdict]


# ------------------------------------------------------------------------------ child helpers
def _emit(spec: dict[str, Any], rows: list[Row], **extra: Any) -> None:
    """Write this section's rows so far (atomically): a crash later still leaves them."""
    from powerclip.atomic import write_json_atomic

    write_json_atomic(spec["result"], {"rows": rows, **extra}, indent=None)


def _deterministic() -> None:
    """Same inputs -> same kernels -> bit-equal losses, so that resume equality tests the resume."""
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _tiny_overrides(spec: dict[str, Any], run_dir: Path, steps: int, precision: str, stage: int) -> list[str]:
    return [f"data.sources=[{{shards: '{spec['shards']}'}}]", f"data.batch_size={spec['batch']}",
            "data.workers=1", "data.shuffle_buffer=64", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.precision={precision}", f"train.zero_stage={stage}", f"train.log_every={steps}",
            "checkpoint.every_minutes=0", "checkpoint.keep_last=2"]


def _resume_pair(config: str, overrides: list[str], work: Path, every: int) -> dict[str, Any]:
    """A full run checkpointing every ``every`` steps, then a new run resumed from its first checkpoint:
    the losses after the checkpoint must be equal, bit for bit."""
    from powerclip.config import load_config
    from powerclip.train.loop import train

    t0 = time.perf_counter()
    full = train(load_config(config, [*overrides, f"train.run_dir={work / 'full'}",
                                      f"checkpoint.every_steps={every}"]))
    t_full = time.perf_counter() - t0
    tags = sorted((work / "full" / "checkpoints").glob(f"*{every:08d}"))
    if not tags:
        raise RuntimeError(f"no checkpoint of step {every} under {work / 'full' / 'checkpoints'}")
    resumed = train(load_config(config, [*overrides, f"train.run_dir={work / 'resumed'}",
                                         f"checkpoint.every_steps={every}", f"checkpoint.resume={tags[0]}"]))
    a, b = full["losses"][every:], resumed["losses"]
    diff = max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))
    finite = all(x == x and abs(x) != float("inf") for x in full["losses"])
    return {"losses": full["losses"], "resumed": b, "equal": len(a) == len(b) and a == b, "max_diff": diff,
            "finite": finite, "seconds_full": t_full, "skipped": full["skipped_steps"]}


# ---------------------------------------------------------------------------------- sections
def sec_numerics(spec: dict[str, Any]) -> None:
    """Powerset and XAC scores in fp32 (TF32 on / off) against float64 at the preset's full size."""
    import torch
    import torch.nn.functional as F

    from powerclip.config import PowersetLossConfig
    from powerclip.losses.concept_xac import xac_scores
    from powerclip.losses.powerset import hardest_negative_triplet, pair_terms

    dev = torch.device(spec["device"])
    sz = spec["numerics"]
    cfg = PowersetLossConfig(weight=1.0)
    delta = cfg.margin
    gen = torch.Generator().manual_seed(0)
    b, m, k, d = sz["B"], sz["M"], sz["K"], sz["D"]
    phi = F.normalize(torch.randn(b, m, d, generator=gen, dtype=torch.float64), dim=-1)
    p = F.normalize(torch.randn(b, k, d, generator=gen, dtype=torch.float64), dim=-1) * 0.8
    rv = torch.rand(b, m, generator=gen) < 0.9
    rv[:, 0] = True
    pv = torch.rand(b, k, generator=gen) < 0.7
    pv[:, 0] = True
    phi, p, rv, pv = phi.to(dev), p.to(dev), rv.to(dev), pv.to(dev)
    pos = torch.arange(b, device=dev)

    def powerset(x_phi, x_p):
        t1, t2 = pair_terms(x_phi, rv, x_p, pv, cfg)
        s = t1 + t2
        return s, hardest_negative_triplet(s, pos, delta)[0].mean()

    s_ref, l_ref = powerset(phi, p)
    t, n, dz = sz["T"], sz["N"], sz["Dx"]
    z = F.normalize(torch.randn(b, t, dz, generator=gen, dtype=torch.float64), dim=-1).to(dev)
    c = F.normalize(torch.randn(n, dz, generator=gen, dtype=torch.float64), dim=-1).to(dev)
    # the reference by explicit pooling in float64: p_in = sum_t softmax(lam S)_t z_t, normalised
    a = torch.softmax(torch.einsum("btd,nd->bnt", z, c), dim=-1)
    x_ref = (F.normalize(torch.bmm(a, z), dim=-1) * c[None]).sum(-1)
    rows: list[Row] = []
    failures = []
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            s32, l32 = powerset(phi.float(), p.float())
            err_s = float((s32.double() - s_ref).abs().max())
            err_l = float((l32.double() - l_ref).abs())
            x32 = xac_scores(z.float(), c.float())
            err_x = float((x32.double() - x_ref).abs().max())
            tag = "on" if tf32 else "off"
            for name, err in ((f"powerset pair scores T1+T2 [{b}x{b}], TF32 {tag}: max abs(fp32 - fp64) / delta", err_s),
                              (f"powerset loss, TF32 {tag}: abs(fp32 - fp64) / delta", err_l),
                              (f"XAC scores [{b}x{n}], T={t}, D={dz}, TF32 {tag}: max abs(fp32 - fp64) / delta", err_x)):
                ok = err / delta < spec["numerics_tol"]
                rows.append([name, f"{err / delta:.2e} (abs {err:.2e})",
                             f"< {spec['numerics_tol']:g}: {'ok' if ok else 'FAIL'}"])
                if not ok:
                    failures.append(name)
            _emit(spec, rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    if failures:
        raise AssertionError(f"fp32 scores disagree with float64 beyond tolerance: {failures}")


def sec_zero(spec: dict[str, Any]) -> None:
    """bf16/fp16 x ZeRO stages: finite losses and an exact resume from the mid-run checkpoint."""
    _deterministic()
    rows: list[Row] = []
    failures = []
    steps, every = spec["steps"], spec["every"]
    for half in spec["precisions"]:
        for stage in spec["stages"]:
            precision = f"amp_{half}" if stage == 0 else half  # half weights at ZeRO-0 are refused
            name = f"tiny config {precision} ZeRO-{stage}: {steps} steps, resume from step {every}"
            work = Path(spec["work"]) / f"zero_{precision}_{stage}"
            try:
                r = _resume_pair(str(ROOT / "configs" / "tiny_cpu.yaml"),
                                 _tiny_overrides(spec, work, steps, precision, stage), work, every)
                ok = r["equal"] and r["finite"]
                value = (f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}; resumed "
                         f"{'equal' if r['equal'] else 'DIFFER (max ' + format(r['max_diff'], '.2e') + ')'}; "
                         f"{r['skipped']} skipped; {r['seconds_full']:.1f} s")
            except Exception as e:  # noqa: BLE001 - recorded, printed, and the section fails below
                traceback.print_exc()
                ok, value = False, f"ERROR {type(e).__name__}: {str(e)[:200]}"
            rows.append([name, value, "exact resume: " + ("ok" if ok else "FAIL")])
            if not ok:
                failures.append(name)
            _emit(spec, rows)
    if failures:
        raise AssertionError(f"failed: {failures}")


def sec_degla(spec: dict[str, Any]) -> None:
    """The DeGLA stage with its EMA teacher (random start weights: the check is the code path)."""
    _deterministic()
    steps, every = spec["steps"], spec["every"]
    precision = spec["precisions"][0]
    work = Path(spec["work"]) / "degla"
    overrides = [*_tiny_overrides(spec, work, steps, precision, 2), "model.pretrained=null",
                 "loss.degla.require_pretrained=false"]
    r = _resume_pair(str(ROOT / "configs" / "degla_tiny_cpu.yaml"), overrides, work, every)
    teacher = sorted((work / "full" / "checkpoints").glob("*/ema_teacher.pt"))
    ok = r["equal"] and r["finite"] and bool(teacher)
    rows = [[f"DeGLA tiny config with EMA teacher, {precision} ZeRO-2: {steps} steps, resume from step {every}",
             f"losses {', '.join(f'{x:.4f}' for x in r['losses'])}; resumed "
             f"{'equal' if r['equal'] else 'DIFFER (max ' + format(r['max_diff'], '.2e') + ')'}; "
             f"teacher saved: {len(teacher)} checkpoint(s)", "exact resume: " + ("ok" if ok else "FAIL")]]
    _emit(spec, rows)
    if not ok:
        raise AssertionError(rows[0][1])


class _SyncWindow:
    """Wraps the run's loader: turns sync debug mode on at hand-over ``start`` and off at ``stop``, and
    notes how many synchronisations had been seen at every hand-over (one interval = one step)."""

    def __init__(self, inner, events: list, start: int, stop: int, cuda: bool) -> None:
        self.inner, self.events, self.start, self.stop, self.cuda = inner, events, start, stop, cuda
        self.marks: list[int] = []

    def __iter__(self):
        import torch

        for i, batch in enumerate(self.inner):
            if self.cuda and i == self.start:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            if self.start <= i <= self.stop:
                self.marks.append(len(self.events))
            if self.cuda and i == self.stop:
                torch.cuda.set_sync_debug_mode(0)
            yield batch

    def state_dict(self):
        return self.inner.state_dict()

    def counters(self):
        return self.inner.counters()


def _sync_site(stack: list) -> str:
    """The innermost frame outside torch and the warnings machinery: the code that synchronised."""
    for fr in reversed(stack):
        f = fr.filename
        if "/torch/" in f or f.endswith("warnings.py") or f.endswith("gpu_check.py"):
            continue
        short = f.split("/powerclip/", 1)[-1] if "/powerclip/" in f else f.split("site-packages/", 1)[-1]
        return f"{short}:{fr.lineno} ({fr.name})"
    return "?"


def sec_syncs(spec: dict[str, Any]) -> None:
    """Host synchronisations per powerset + concept training step, and where they happen."""
    import traceback as tb
    import warnings

    import torch

    from powerclip.config import load_config
    from powerclip.data import build_loader
    from powerclip.train.loop import train

    cuda = spec["device"] == "cuda"
    work = Path(spec["work"]) / "syncs"
    start, stop = 2, spec["steps"] - 1  # hand-overs: step 1 warms up, the last step logs and saves
    cfg = load_config(str(ROOT / "configs" / "tiny_cpu.yaml"),
                      [*_tiny_overrides(spec, work, spec["steps"], spec["precisions"][0], 2),
                       "checkpoint.every_steps=0", "loss.powerset.weight=0.2", "loss.concept.npc_weight=1.0",
                       "loss.concept.xac_weight=1.0", "data.concepts=true", "data.num_regions=10",
                       "data.max_phrases=16", "train.log_every=1000"])
    events: list[str] = []
    windows: list[_SyncWindow] = []

    def factory(c, rank, world, state=None):
        w = _SyncWindow(build_loader(c, rank, world, state=state), events, start, stop, cuda)
        windows.append(w)
        return w

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            events.append(_sync_site(tb.extract_stack()[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        try:
            train(cfg, build_loader=factory)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    marks = windows[0].marks
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    if not per_step:
        raise RuntimeError(f"no step inside the sync window (marks {marks})")
    sites = Counter(events)
    n_steps = len(per_step)
    listing = "; ".join(f"{site} x{cnt / n_steps:g}" for site, cnt in sites.most_common())
    value = (f"{per_step} per step over {n_steps} steps: {listing or 'none'}" if cuda
             else f"not measured on CPU (sync debug mode is CUDA-only); {n_steps} steps ran")
    verdict = ("<= 1: " + ("ok" if max(per_step) <= 1 else "missed")) if cuda else "n/a"
    _emit(spec, [["host syncs per powerset + XAC + NPC training step (bf16 ZeRO-2, tiny config)", value, verdict]],
          per_step=per_step, sites=dict(sites))


def sec_bench(spec: dict[str, Any]) -> None:
    """tools/bench_breakdown.py on this device; its headline rows copied into the table."""
    out = Path(spec["out_dir"])
    cmd = [sys.executable, str(ROOT / "tools" / "bench_breakdown.py"), "--out-dir", str(out),
           "--work", str(Path(spec["work"]) / "bench_work")]
    if spec.get("bench_budget_s") is not None:
        cmd += ["--budget-s", str(spec["bench_budget_s"])]
    if spec["device"] != "cuda":
        cmd.append("--cpu-smoke")
    cmd += ["--benchmarks", spec.get("benchmarks") or ""]  # gpu_check decides where tables go
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])), check=False)
    result = out / "bench_breakdown.json"
    if not result.exists():
        raise RuntimeError(f"tools/bench_breakdown.py failed (exit {proc.returncode}) and wrote no result")
    _emit(spec, breakdown_rows(json.loads(result.read_text())))
    if proc.returncode != 0:
        raise RuntimeError(f"tools/bench_breakdown.py: some measurements did not run (exit {proc.returncode}); "
                           f"see {out / 'bench_breakdown.md'}")


def breakdown_rows(res: dict[str, Any]) -> list[Row]:
    """The headline figures of a bench_breakdown.json: each model-only variant's step split, the loader
    per-core ratio, the end-to-end throughput ratio."""
    rows: list[Row] = []
    b = res["sizes"]["batch"]
    smoke = res["sizes"]["smoke"]

    def verdict(ok: bool, target: str) -> str:
        return "n/a (toy sizes)" if smoke else f"{target}: " + ("ok" if ok else "missed")

    for name, w in ((res.get("model") or {}).get("best") or {}).items():
        split = "/".join(f"{w[k] * 1e3:.1f}" if k in w else "-" for k in ("forward", "backward", "optimizer"))
        rows.append([f"model only, batch {b}: {name}", f"{w['step'] * 1e3:.1f} ms/step (fwd/bwd/opt {split} ms), "
                     f"{b / w['step']:.1f} samples/s", ""])
    ld = res.get("loader")
    if ld:
        oc, pc = ld["loaders"].get("open_clip"), ld["loaders"].get(ld["preset_loader"])
        if oc and pc:
            r = oc["worker_cpu"] / pc["worker_cpu"]
            rows.append([f"loader per core, {ld['preset_loader']} / open_clip_train ({ld['workers']} workers)",
                         f"{r:.3f} ({pc['sps']:.0f} vs {oc['sps']:.0f} samples/s)",
                         verdict(r >= 1.0, ">= 1.0")])
    e = res.get("e2e") or {}
    oc_t = (e.get("best_s") or {}).get("open_clip_train")
    for name, t in (e.get("best_s") or {}).items():
        if oc_t and name != "open_clip_train":
            rows.append([f"end to end {name} / open_clip_train", f"{oc_t / t:.3f} ({b / t:.0f} samples/s)",
                         verdict(oc_t / t >= 1.1, ">= 1.1")])
    for name, err in {**(res.get("section_errors") or {}), **((res.get("model") or {}).get("errors") or {}),
                      **(e.get("errors") or {})}.items():
        rows.append([f"not measured: {name}", err[:200], "FAIL"])
    return rows or [["bench_breakdown", "no figures", "FAIL"]]


CHILDREN = {"numerics": sec_numerics, "zero": sec_zero, "degla": sec_degla, "syncs": sec_syncs,
            "bench": sec_bench}


# ------------------------------------------------------------------------------------ parent
def sizes(smoke: bool, device: str) -> dict[str, Any]:
    """Everything the sections read: toy sizes for --cpu-smoke, the check's sizes on a GPU."""
    if smoke:
        return {"device": device, "batch": 8, "steps": 4, "every": 2, "precisions": ["bf16", "fp16"],
                "stages": [0, 3], "numerics": {"B": 8, "M": 4, "K": 4, "D": 32, "T": 16, "N": 24, "Dx": 32},
                "numerics_tol": 1e-2}
    return {"device": device, "batch": 32, "steps": 6, "every": 3, "precisions": ["bf16", "fp16"],
            "stages": [0, 2, 3],
            "numerics": {"B": 256, "M": 10, "K": 16, "D": 512, "T": 196, "N": 768, "Dx": 768},
            "numerics_tol": 1e-2}


def make_shards(work: Path, smoke: bool) -> str:
    from powerclip.data.synthetic import make_synthetic

    root = work / "synth"
    if not (root / "manifest.json").exists():
        make_synthetic(root, train_shards=2, val_shards=0, heldout_shards=0, per_shard=64 if smoke else 128,
                       image_size=64)
    return str(root / "train" / "{00000..00001}.tar")


def _cell(x: Any) -> str:
    return str(x).replace("|", "/").replace("\n", " ")


def render(results: list[dict[str, Any]], info: dict[str, str]) -> str:
    lines = [f"### GPU check, {info['date']}: {info['device']}", "",
             f"`tools/gpu_check.sh`; torch {info['torch']}, deepspeed {info['deepspeed']}, open_clip "
             f"{info['open_clip']}, Python {info['python']}, {info['cores']} CPU cores.", "",
             "| section | measurement | value | verdict |", "|---|---|---|---|"]
    for r in results:
        head = f"{r['section']} ({r['status']}, {r['seconds']:.0f} s)"
        if not r["rows"]:
            lines.append(f"| {head} | - | {_cell(r.get('error', '') or '-')} | |")
        for i, row in enumerate(r["rows"]):
            lines.append(f"| {head if i == 0 else ''} | {' | '.join(_cell(x) for x in row)} |")
        if r["rows"] and r.get("error"):
            lines.append(f"| | error | {_cell(r['error'])} | |")
    return "\n".join(lines) + "\n"


GPU_CHECK_HEADING = "## GPU check runs"  # tools/bench_train.py keeps this section when it rewrites the file


def append_to_benchmarks(path: Path, table: str) -> None:
    """Append one run's table under the GPU-check heading (created on first use)."""
    text = path.read_text() if path.exists() else ""
    if GPU_CHECK_HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{GPU_CHECK_HEADING}\n\nWritten by `tools/gpu_check.sh` on a GPU; newest last.\n"
    path.write_text(text.rstrip("\n") + "\n\n" + table)


def machine_info(device: str) -> dict[str, str]:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "cores": str(os.cpu_count()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run, toy sizes)"}
    for mod in ("deepspeed", "open_clip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - shown in the table; the sections then fail loudly
            info[mod] = f"missing ({type(e).__name__})"
    return info


def run_section(name: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    result = Path(spec["work"]) / f"{name}.result.json"
    result.unlink(missing_ok=True)
    spec = {**spec, "result": str(result)}
    print(f"\n===== gpu_check: section {name} (timeout {timeout:.0f} s)", flush=True)
    t0 = time.perf_counter()
    status, error = "ok", ""
    try:
        env = dict(os.environ)
        if name in DETERMINISTIC:  # deterministic cuBLAS, set before the child touches CUDA
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name,
                               "--spec", json.dumps(spec)], timeout=timeout, check=False, env=env)
        if proc.returncode != 0:
            status, error = "FAIL", f"exit {proc.returncode} (traceback in the log above)"
    except subprocess.TimeoutExpired:
        status, error = "FAIL", f"timed out after {timeout:.0f} s"
    data = json.loads(result.read_text()) if result.exists() else {"rows": []}
    if status == "ok" and not data["rows"]:
        status, error = "FAIL", "no result written"
    return {"section": name, "status": status, "seconds": time.perf_counter() - t0, "error": error, **data}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections ({','.join(SECTIONS)})")
    ap.add_argument("--cpu-smoke", action="store_true", help="every section at toy size on CPU")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: sections that no longer fit are skipped and reported as not run "
                         "(default 690 s on a GPU, of which the bench takes up to 480 s; none for --cpu-smoke)")
    ap.add_argument("--out-dir", default=None, help="results folder (default $OUT, else runs/gpu_check)")
    ap.add_argument("--work", default=None, help="scratch folder (default a temp dir)")
    ap.add_argument("--benchmarks", default=str(ROOT / "BENCHMARKS.md"),
                    help="markdown file the final table is appended to on a GPU ('' for none)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.spec)
        if spec["device"] == "cuda":
            import torch

            torch.cuda.init()
        CHILDREN[a.child](spec)
        return 0

    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    import torch

    if a.cpu_smoke:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("gpu_check: no CUDA device (use --cpu-smoke for the CPU smoke run)", file=sys.stderr)
        return 2
    out_dir = Path(a.out_dir or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    print(f"gpu_check on {info['device']}: torch {info['torch']}, deepspeed {info['deepspeed']}, "
          f"open_clip {info['open_clip']}; sections {','.join(only)}", flush=True)
    budget = a.budget_s if a.budget_s is not None else (float("inf") if a.cpu_smoke else 690.0)
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {**sizes(a.cpu_smoke, device), "work": str(work), "out_dir": str(out_dir),
                "benchmarks": a.benchmarks if device == "cuda" else ""}
        if {"zero", "degla", "syncs"} & set(only):
            spec["shards"] = make_shards(work, a.cpu_smoke)
        jsonl = out_dir / "gpu_check.jsonl"
        for name in [s for s in SECTIONS if s in only]:
            left = budget - (time.perf_counter() - t_start)
            if left < MIN_SECONDS[name]:
                res = {"section": name, "status": "NOT RUN", "seconds": 0.0, "rows": [],
                       "error": f"skipped: {left:.0f} s of the {budget:.0f} s budget left"}
            else:
                # the bench stops itself within its budget, with room to write its table
                spec["bench_budget_s"] = min(BENCH_MAX_S, max(left - 30.0, 10.0)) if left < float("inf") else None
                res = run_section(name, spec, timeout=min(max(left, 10.0), 3600.0))
            results.append(res)
            with open(jsonl, "a") as f:
                f.write(json.dumps({**res, "date": info["date"], "device": info["device"]}) + "\n")
            (out_dir / "gpu_check.md").write_text(render(results, info))
            print(f"===== gpu_check: {name} {res['status']} in {res['seconds']:.0f} s {res['error']}", flush=True)
    table = render(results, info)
    print("\n" + table, flush=True)
    if device == "cuda" and a.benchmarks:
        append_to_benchmarks(Path(a.benchmarks), table)
    bad = [r["section"] for r in results if r["status"] != "ok"]
    print(f"gpu_check: {len(results) - len(bad)}/{len(results)} sections ok"
          + (f"; failed or not run: {', '.join(bad)}" if bad else "")
          + f"; {time.perf_counter() - t_start:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
