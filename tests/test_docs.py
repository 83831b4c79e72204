"""The documentation in docs/ and README.md against the code it describes.

The pages are written by hand, so they drift when the code changes. These checks make a drift fail
the suite instead: every loss config key is documented with the default the schema has and the
values the presets set, every ``Batch`` and ``Features`` field is described, every test the pages
cite as a guard exists, every code path they list exists, and every relative link (with its
``#anchor``) resolves.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from powerclip.config import Config, LossConfig
from powerclip.data.batch import Batch
from powerclip.model.features import Features

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
LINKED = [ROOT / "README.md", *PAGES]


def _prose_lines(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _unquote(cell: str) -> str:
    cell = cell.strip()
    return cell[1:-1] if len(cell) >= 2 and cell[0] == cell[-1] == "`" else cell


def key_rows(path: Path) -> list[tuple[str, str, str]]:
    """(key, default, presets) of every row of the tables whose header starts with ``key | default``."""
    rows, in_table = [], False
    for line in _prose_lines(path):
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        cells = _cells(line)
        if cells[:2] == ["key", "default"]:
            in_table = True
            continue
        if in_table and not set(cells[0]) <= set("-: "):
            rows.append((_unquote(cells[0]), _unquote(cells[1]), cells[2]))
    return rows


def _leaf_keys(obj: Any, prefix: str) -> dict[str, Any]:
    """Dotted key -> default of every non-dataclass field under ``obj``."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(_leaf_keys(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


DEFAULTS = _leaf_keys(Config(), "")


def _doc_value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _same(doc: Any, code: Any) -> bool:
    if isinstance(code, bool) or isinstance(doc, bool) or code is None or doc is None:
        return doc is code or doc == code and type(doc) is type(code)
    if isinstance(code, (int, float)):
        return isinstance(doc, (int, float)) and math.isclose(float(doc), float(code), rel_tol=1e-12)
    if isinstance(code, list):
        return isinstance(doc, list) and len(doc) == len(code) and all(map(_same, doc, code))
    return doc == code


def _preset_value(name: str, key: str) -> tuple[bool, Any]:
    """(set explicitly, value) of ``key`` in configs/NAME.yaml as written (no schema defaults)."""
    node: Any = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def test_every_loss_config_key_is_documented_in_losses_md():
    documented = {key for key, _, _ in key_rows(DOCS / "losses.md")}
    loss_keys = set(_leaf_keys(LossConfig(), "loss."))
    missing = sorted(loss_keys - documented)
    assert not missing, f"docs/losses.md has no `key | default` row for {missing}"


def test_documented_defaults_and_preset_values_match_the_code():
    rows = [(page.name, *row) for page in PAGES for row in key_rows(page)]
    assert len(rows) > 40  # the loss tables alone have more; an empty parse must not pass
    for page, key, default, presets in rows:
        assert key in DEFAULTS, f"docs/{page}: `{key}` is not a config key"
        assert _same(_doc_value(default), DEFAULTS[key]), (
            f"docs/{page}: `{key}` default documented as {default!r}, the schema has {DEFAULTS[key]!r}")
        listed = {}
        for entry in filter(None, (e.strip() for e in presets.split(";"))):
            name, _, value = _unquote(entry).partition(": ")
            assert name in PRESETS, f"docs/{page}: `{key}`: {name!r} is not a preset in configs/"
            listed[name] = value
        for name in PRESETS:
            is_set, value = _preset_value(name, key)
            if name in listed:
                assert is_set, f"docs/{page}: `{key}` listed for {name}, which does not set it"
                assert _same(_doc_value(listed[name]), value), (
                    f"docs/{page}: `{key}` documented as {listed[name]!r} in {name}, the preset has {value!r}")
            else:
                assert not is_set, f"docs/{page}: `{key}`: preset {name} sets {value!r} but is not listed"


def _table_first_column(path: Path, heading: str) -> list[str]:
    """First-column entries of the first table after ``heading``."""
    lines = _prose_lines(path)
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    out, seen_table = [], False
    for line in lines[start + 1:]:
        if line.lstrip().startswith("|"):
            seen_table = True
            first = _cells(line)[0]
            if first != "field" and not set(first) <= set("-: "):
                out.append(_unquote(first))
        elif seen_table:
            break
    return out


def test_batch_fields_table_is_exactly_the_batch_dataclass():
    documented = _table_first_column(DOCS / "data.md", "### Batch fields")
    assert sorted(documented) == sorted(f.name for f in fields(Batch)), (
        "the Batch fields table of docs/data.md does not list exactly the fields of Batch")


def test_every_features_field_is_described_in_architecture_md():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    missing = [f.name for f in fields(Features) if f"`{f.name}`" not in text]
    assert not missing, f"docs/architecture.md does not mention Features fields {missing}"


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


TEST_REF = re.compile(r"tests/(\w+\.py)(?:::(\w+))?")


def test_every_cited_test_exists():
    cited = 0
    for page in LINKED:
        for file, name in TEST_REF.findall(page.read_text(encoding="utf-8")):
            path = ROOT / "tests" / file
            assert path.is_file(), f"{page.name} cites tests/{file}, which does not exist"
            if name:
                assert name in _functions(path), f"{page.name} cites tests/{file}::{name}, which does not exist"
                cited += 1
    assert cited >= 20  # the guarded-bugs and choices tables name their tests


def test_guarded_bugs_each_name_a_test():
    lines = _prose_lines(DOCS / "losses.md")
    start = next(i for i, line in enumerate(lines) if line.startswith("## 8."))
    rows = [line for line in lines[start:] if line.startswith("|") and not line.startswith("| source")
            and not set(line) <= set("|-: ")]
    assert len(rows) >= 3
    for row in rows:
        assert TEST_REF.search(_cells(row)[-1]), f"guarded bug without a test: {row[:80]}"


CODE_PATH = re.compile(r"`((?:powerclip|tools|slurm|configs)/[\w./-]*)`")


def test_every_code_path_named_in_docs_exists():
    named = [(page.name, p) for page in PAGES for p in CODE_PATH.findall(page.read_text(encoding="utf-8"))]
    assert len(named) > 20
    missing = [f"{page}: {p}" for page, p in named if not (ROOT / p).exists()]
    assert not missing, f"paths named in docs/ that do not exist (moved? update the page): {missing}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in _prose_lines(path) if re.match(r"#{1,6} ", line)}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    for line in _prose_lines(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            assert dest.exists(), f"{page.name}: link {target!r} leads nowhere"
            if anchor and dest.suffix == ".md":
                assert anchor in _anchors(dest), f"{page.name}: link {target!r}: no such heading in {dest.name}"


def test_docs_do_not_point_outside_the_repository():
    for page in LINKED:
        text = page.read_text(encoding="utf-8")
        for outside in ("../shared", "METHODS.md", "DESIGN.md", "SCALE.md"):
            assert outside not in text, f"{page.name} refers to {outside}, which users of the repository never get"


def test_slug_and_table_parsing():
    assert slug("2. PowerCLIP: powerset alignment") == "2-powerclip-powerset-alignment"
    assert slug("The annotation json (schema 1)") == "the-annotation-json-schema-1"
    page = DOCS / "losses.md"
    rows = {k: (d, p) for k, d, p in key_rows(page)}
    assert rows["loss.powerset.tau"][0] == "0.001" and "powerclip_vitb16_cc12m" in rows["loss.powerset.tau"][1]
    assert _same(_doc_value("1e-3"), 0.001) and not _same(_doc_value("0.01"), 0.001)
    assert not _same(_doc_value("false"), 0) and _same(_doc_value("null"), None)


def test_every_aug_key_is_documented_in_data_md():
    documented = {key for key, _, _ in key_rows(DOCS / "data.md")}
    missing = sorted({k for k in DEFAULTS if k.startswith("aug.")} - documented)
    assert not missing, f"docs/data.md has no `key | default` row for {missing}"


def test_training_option_keys_are_documented_in_training_options_md():
    """Tower options, the schedule's keys and log.* each have a row (default checked above)."""
    documented = {key for key, _, _ in key_rows(DOCS / "training_options.md")}
    wanted = {k for k in DEFAULTS if k.startswith(("optim.image.", "optim.text.", "optim.cooldown_", "log."))}
    missing = sorted((wanted | {"optim.schedule"}) - documented)
    assert not missing, f"docs/training_options.md has no `key | default` row for {missing}"
