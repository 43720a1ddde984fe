"""DistributedDataParallel on the CPU (gloo): two processes end with identical weights, equal to one process
with the same effective batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_tiny_davis2016, tiny_config, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Run by torchrun: train, then every rank (not only rank 0) dumps the hash and the weights it ends with.
DRIVER = """
import os, sys
from pathlib import Path
import torch
from lmrc.model.weights import tensors_digest
from lmrc.train.config import load_config
from lmrc.train.trainer import train

config, out = sys.argv[1], Path(sys.argv[2])
torch.set_num_threads(1)
result = train(load_config(config), out, device_name="cpu")
rank = int(os.environ.get("RANK", "0"))
state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
(out / f"hash-rank{rank}.txt").write_text(tensors_digest(state))
torch.save(state, out / f"state-rank{rank}.pt")
"""


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_end_identical_and_equal_one_process(tmp_path):
    data = make_tiny_davis2016(tmp_path / "davis2016")
    cfg = write_config(tmp_path / "c.yaml", tiny_config(data, optim={
        "iterations": 3, "batch_size": 2, "lr": 1e-4, "precision": "fp32", "grad_clip": 1.0}))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    two = subprocess.run([*_torchrun(), "--standalone", "--nproc_per_node", "2", str(driver), str(cfg),
                          str(tmp_path / "two")], env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    hashes = [(tmp_path / "two" / f"hash-rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1], "the ranks diverged"
    assert "batch 2 (2 x 1)" in two.stdout

    one = subprocess.run([sys.executable, str(driver), str(cfg), str(tmp_path / "one")], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "two" / "state-rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "one" / "state-rank0.pt", weights_only=True)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    # Same samples, gradients averaged over ranks = the 1-process batch mean; only summation order differs.
    assert worst < 1e-5, worst


def test_batch_not_divisible_by_processes_is_an_error(tmp_path, monkeypatch):
    from lmrc.errors import LmrcError
    from lmrc.train import trainer
    from lmrc.train.config import load_config

    data = make_tiny_davis2016(tmp_path / "davis2016", sequences=2, frames=4)
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config(data, optim={"batch_size": 3})))
    monkeypatch.setattr(trainer, "setup_distributed", lambda device: trainer.Dist(rank=0, world_size=2))
    with pytest.raises(LmrcError, match="not divisible by the 2 processes"):
        trainer.train(cfg, tmp_path / "run", device_name="cpu")


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "lmrc.train", "--help"], env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout and "--resume" in out.stdout
