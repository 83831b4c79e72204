"""docs/open_clip_flags.md against the installed open_clip_train: every flag its argument parser
defines has a row, no row names a flag it lacks, and every powerclip key a row names is a config key
(or a key inside the free-form ``model.config``); a "not supported" row gives its reason."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from powerclip.config import Config, DataSourceConfig
from tests.test_docs import _cells, _leaf_keys, _prose_lines

PAGE = Path(__file__).resolve().parents[1] / "docs" / "open_clip_flags.md"
SECTIONS = ("data.", "aug.", "model.", "loss.", "optim.", "train.", "checkpoint.", "eval.", "log.", "slurm.")


def open_clip_train_flags(monkeypatch) -> set[str]:
    """The long option of every argument of open_clip_train's parser (its own ``parse_args``)."""
    params = pytest.importorskip("open_clip_train.params")
    seen: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.append(self)
        return parse(self, [], namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    params.parse_args([])
    assert len(seen) == 1
    return {max(a.option_strings, key=len) for a in seen[0]._actions if a.option_strings and a.dest != "help"}


def _rows() -> list[list[str]]:
    rows = []
    for line in _prose_lines(PAGE):
        cells = _cells(line) if line.startswith("|") else []
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows.append(cells)
    return rows


def _is_key(key: str, keys: set[str]) -> bool:
    """A config key; ``data.sources[].FIELD`` a field of a source entry; ``model.config.*`` free-form."""
    if key == "model.config" or key.startswith("model.config."):
        return True
    if key.startswith("data.sources[]."):
        return key.removeprefix("data.sources[].") in {f.name for f in fields(DataSourceConfig)}
    return key in keys


def test_every_open_clip_train_flag_is_mapped(monkeypatch):
    flags = open_clip_train_flags(monkeypatch)
    assert len(flags) > 80
    documented = [r[0].strip("`") for r in _rows()]
    assert len(documented) == len(set(documented)), "a flag has two rows"
    assert not flags - set(documented), f"docs/open_clip_flags.md lacks {sorted(flags - set(documented))}"
    assert not set(documented) - flags, f"not open_clip_train flags: {sorted(set(documented) - flags)}"


def test_every_named_key_exists_and_every_unsupported_flag_says_why():
    keys = set(_leaf_keys(Config(), ""))
    named = 0
    for flag, target, notes in _rows():
        if target == "not supported":
            assert len(notes) > 10, f"{flag}: 'not supported' without a reason"
            continue
        found = [k.split("=")[0] for k in re.findall(r"`([^`]+)`", target) if k.startswith(SECTIONS)]
        assert found, f"{flag}: names no powerclip key ({target!r})"
        for key in found:
            assert _is_key(key, keys), f"{flag}: `{key}` is not a powerclip config key"
            named += 1
    assert named > 40
