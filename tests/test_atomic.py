"""powerclip.atomic: the one tmp-file-and-rename writer of ledgers, eval results and bench results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerclip.atomic import write_json_atomic, write_text_atomic


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "ledger.json"
    path.write_text("old")
    before = path.stat().st_ino
    assert write_json_atomic(path, {"a": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert path.read_text() == json.dumps({"a": [1, 2]}, indent=1)
    assert path.stat().st_ino != before  # a new file renamed over the old one, not rewritten in place
    assert write_text_atomic(str(path), "x\ny\n").read_text() == "x\ny\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"step": 1}, indent=None)
    with pytest.raises(TypeError):
        write_json_atomic(path, {"step": object()})
    with pytest.raises(TypeError):  # fails while writing the temporary file
        write_text_atomic(path, b"bytes are not text")  # type: ignore[arg-type]
    assert path.read_text() == '{"step": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
