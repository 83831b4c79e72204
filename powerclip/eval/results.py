"""Results in clip_benchmark's output schema, one JSON file per (dataset, task).

clip_benchmark writes ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` per run and
``clip_benchmark build FILES|DIRS`` turns such files into one CSV; writing the same schema lets users
put powerclip's and clip_benchmark's results side by side with the tool they already use.
"""

from __future__ import annotations

from pathlib import Path

from powerclip.atomic import write_json_atomic


def record(dataset: str, task: str, metrics: dict[str, float], model: str, pretrained: str,
           language: str = "en") -> dict:
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": {k: float(v) for k, v in metrics.items()}, "language": language}


def slug(text: str) -> str:
    return text.replace("/", "_").replace(":", "_").strip("_")


def write_results(results: dict[str, dict], out: str | Path, model: str, pretrained: str,
                  language: str = "en") -> list[Path]:
    """Write every result; ``out`` is a folder, or a ``.json`` path (several results get ``.<dataset>``).

    Files are written atomically (tmp + rename) so a reader never sees half a file.
    """
    out = Path(out)
    items = [record(ds, r["task"], r["metrics"], model, pretrained, language) for ds, r in results.items()]
    paths: list[Path] = []
    for rec in items:
        if out.suffix == ".json":
            path = out if len(items) == 1 else out.with_name(f"{out.stem}.{slug(rec['dataset'])}.json")
        else:
            path = out / f"{slug(rec['dataset'])}_{slug(Path(pretrained).name or pretrained)}_{rec['task']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_json_atomic(path, rec))
    return paths
