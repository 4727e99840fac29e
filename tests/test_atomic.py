"""The one atomic-write helper: a failed write leaves the previous version and no debris."""

import json
import os

import pytest

from k15jax.infra import atomic


def test_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic.directory(str(target)) as tmp:
        (tmp_path / "model_seen").write_text(str(os.path.exists(target)))
        open(os.path.join(tmp, "a"), "w").write("1")
    assert (target / "a").read_text() == "1"
    assert (tmp_path / "model_seen").read_text() == "False"  # absent until complete
    with pytest.raises(RuntimeError, match="killed"):
        with atomic.directory(str(target)) as tmp:
            open(os.path.join(tmp, "b"), "w").write("half")
            raise RuntimeError("killed mid-write")
    assert sorted(os.listdir(target)) == ["a"]  # the old version, untouched
    with atomic.directory(str(target)) as tmp:
        open(os.path.join(tmp, "c"), "w").write("2")
    assert sorted(os.listdir(target)) == ["c"]  # replaced, not merged
    assert sorted(os.listdir(tmp_path)) == ["model", "model_seen"]  # no temporary left


def test_json_once_computes_once_and_write_failure_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "r.json")
    calls = []
    assert atomic.json_once(path, lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert atomic.json_once(path, lambda: calls.append(1) or {"x": 2}) == {"x": 1}
    assert calls == [1]
    with pytest.raises(TypeError):
        atomic.write_json(path, {"x": object()})  # not serializable: fails before the rename
    assert json.load(open(path)) == {"x": 1}
    assert os.listdir(tmp_path) == ["r.json"]
