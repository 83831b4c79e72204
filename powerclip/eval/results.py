"""Results in clip_benchmark's output schema: one JSON record per (dataset, task).

clip_benchmark writes ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` per run and
``clip_benchmark build FILES|DIRS`` turns such files into one CSV; writing the same schema lets users
put powerclip's and clip_benchmark's results side by side with the tool they already use.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

from powerclip.atomic import write_json_atomic


def record(dataset: str, task: str, metrics: dict[str, float], model: str, pretrained: str,
           language: str = "en") -> dict:
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
            "metrics": {k: float(v) for k, v in metrics.items()}, "language": language}


def slug(text: str) -> str:
    return text.replace("/", "_").replace(":", "_").strip("_")


RESULT_KEYS = frozenset({"dataset", "model", "pretrained", "task", "metrics"})


def check_replaceable(path: Path) -> None:
    """Refuse to overwrite ``path`` unless it is missing or an earlier result file (a JSON object
    with clip_benchmark's result keys): ``--out`` never replaces a file evaluation did not write."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    records = data if isinstance(data, list) and data else [data]  # FILE.json holds one record or a list
    if not all(isinstance(r, dict) and RESULT_KEYS <= set(r) for r in records):
        raise FileExistsError(errno.EEXIST, "exists and is not an earlier evaluation result; refusing to "
                              "overwrite it (choose another --out)", str(path))


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
        check_replaceable(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        return [write_json_atomic(out, items[0] if len(items) == 1 else items)]
    paths: list[Path] = []
    for rec in items:
        path = out / f"{slug(rec['dataset'])}_{slug(Path(pretrained).name or pretrained)}_{rec['task']}.json"
        check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_json_atomic(path, rec))
    return paths
