"""Atomic writes: all or nothing, with the usual permissions."""
import os

import pytest

from lmrc.fileio import atomic_path


def test_atomic_path_renames_on_success_with_umask_permissions(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    target = tmp_path / "out" / "weights.safetensors"
    with atomic_path(target) as tmp:
        save_file({"a": torch.ones(2)}, str(tmp))  # safetensors replaces the file with a 0600 one of its own
        assert not target.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert torch.equal(load_file(str(target))["a"], torch.ones(2))
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["weights.safetensors"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.txt"]
