"""Results in clip_benchmark's output schema, one JSON file per (dataset, task).

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
    if not (isinstance(data, dict) and RESULT_KEYS <= set(data)):
        raise FileExistsError(errno.EEXIST, "exists and is not an earlier evaluation result; refusing to "
                              "overwrite it (choose another --out)", str(path))


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
        check_replaceable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(write_json_atomic(path, rec))
    return paths
