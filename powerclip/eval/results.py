"""Results in clip_benchmark's output schema: one JSON record per (dataset, task).

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
    """Write every result; returns the files written.

    ``out`` ending in ``.json``: that one file, holding the record of a single result, or the list
    of records when there are several. Otherwise ``out`` is a folder with one record per file, named
    as clip_benchmark names its own outputs: the form ``clip_benchmark build DIR`` reads (it takes one
    record per file). Files are
    written atomically (tmp + rename) so a reader never sees half a file.
    """
    out = Path(out)
    items = [record(ds, r["task"], r["metrics"], model, pretrained, language) for ds, r in results.items()]
    if out.suffix == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        return [write_json_atomic(out, items[0] if len(items) == 1 else items)]
    paths: list[Path] = []
    for rec in items:
        path = out / f"{slug(rec['dataset'])}_{slug(Path(pretrained).name or pretrained)}_{rec['task']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_json_atomic(path, rec))
    return paths
