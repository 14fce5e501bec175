"""Data-parallel training under torchrun on the CPU (gloo): the ranks stay in step,
rank 0 alone writes the run's files, and a run whose rank dies resumes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pfadseg import checkpoint as ckpt
from pfadseg.trainer import STATE_FORMAT, STATE_NAME

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ...`: two CPU processes, one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_two_ranks_learn_what_one_process_learns_from_the_same_batch(tmp_path: Path) -> None:
    """Stage 1's loss sums over the batch (Eq. 4) and DDP averages gradients: without
    scaling by the rank count, two ranks stepped at half the learning rate. Two ranks
    of 2 images move the student as one process of the same 4 does (up to rounding,
    which batch norm of 2x2 features makes ~0.1%). Stage 2's losses are means: right
    as they were."""
    env = {"PFADSEG_TEST_SAME_BATCH": "1", "OMP_NUM_THREADS": "1"}
    result = torchrun(WORKER, tmp_path / "two", env={**env, "PFADSEG_TEST_WEIGHTS": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    (tmp_path / "one").mkdir()
    single = subprocess.run([sys.executable, WORKER, tmp_path / "one" / "run"], capture_output=True,
                            text=True, env={**os.environ, **env, "PFADSEG_TEST_WEIGHTS": str(tmp_path / "one")},
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    init = torch.load(tmp_path / "one" / "init_rank0.pt")
    assert all(torch.equal(init[k], v) for k, v in torch.load(tmp_path / "init_rank0.pt").items())
    one, two = torch.load(tmp_path / "one" / "rank0.pt"), torch.load(tmp_path / "rank0.pt")
    keys = [k for k in init if k.startswith("student.") and init[k].is_floating_point() and "running_" not in k]
    moved_one = torch.cat([(one[k] - init[k]).flatten() for k in keys])
    moved_two = torch.cat([(two[k] - init[k]).flatten() for k in keys])
    assert float(moved_one.norm()) > 0
    assert float((moved_two - moved_one).norm() / moved_one.norm()) < 0.02  # was 0.5: half the step


def test_a_dying_rank_stops_the_run_and_resumed_the_ranks_end_identical(tmp_path: Path) -> None:
    """Rank 1 dies at step 4: the run stops with step 3's state intact. Resumed, rank 0
    alone validates and writes; the student it puts back at the end of stage 1 (step 3's,
    picked before the crash, not the last) reaches the other rank, and the ranks end with
    identical weights."""
    out = tmp_path / "run"
    died = torchrun(WORKER, out, env={"PFADSEG_TEST_WEIGHTS": str(tmp_path), "PFADSEG_TEST_DIE_AT": "4"})
    assert died.returncode != 0
    tensors, meta = ckpt.read(out / STATE_NAME, kind=STATE_FORMAT)
    assert meta["step"] == 3 and meta["world_size"] == 2  # the last state is intact
    assert meta["student_pick"]["step"] == 3
    assert not torch.equal(tensors["rng"], tensors["rng.1"])  # each rank draws its own defects
    assert not (out / "checkpoint.safetensors").exists()
    resumed = torchrun(WORKER, out, "--resume", env={"PFADSEG_TEST_WEIGHTS": str(tmp_path)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks' weights drifted apart"
    assert json.loads((out / "validation.json").read_text())["student_step"] == 3
    # the state file is removed once the checkpoint is written
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.safetensors", "config.json", "losses.csv", "validation.csv", "validation.json"]
    # one writer: each step once, across the crash
    assert [r[0] for r in list(csv.reader(open(out / "losses.csv")))[1:]] == ["1", "2", "3", "4", "5"]
    assert [r[0] for r in list(csv.reader(open(out / "validation.csv")))[1:]] == ["3", "4", "5"]


def test_cli_under_torchrun_writes_a_checkpoint(tmp_path: Path) -> None:
    """The README's command: `torchrun --nproc-per-node 2 -m pfadseg train ...`, with the
    tiny preset's own batch (two images per process)."""
    demo = Path(__file__).parents[1] / "pfadseg" / "demo_data" / "bottle" / "train" / "good"
    out = tmp_path / "run"
    result = torchrun("-m", "pfadseg", "train", "--train-dir", demo, "--teacher", "efficientnet_lite0",
                      "--preset", "tiny", "--image-size", "64", "--device", "cpu",
                      "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoint.safetensors").is_file()
    # rank 1 prints errors only: every line shows once
    assert result.stdout.count("checkpoint: ") == 1, result.stdout
    # a bar's first frame (0%) shows once per bar; its later frames depend on timing
    for line in ("training pfadseg", "no textures given", "loading training images:   0%"):
        assert result.stderr.count(line) == 1, result.stderr[-3000:]
