"""Issue 5: an interrupted run continues with --resume and ends bit-identical to an
uninterrupted one (same seed, fp32). Small on purpose: 64x64, tiny preset, 2 + 2 steps,
with the cosine learning-rate schedule (set per step, so it needs no saved state) and
validation (8 images, 4 of them held out; its rows of a killed run are trimmed too).

Every run here uses one CPU thread (`--threads 1`), in this process and in the
child processes: results are bit-exact only between runs with the same thread
count (the kernels' reductions split differently), and an in-process reference
otherwise takes whatever thread count earlier tests left behind (issue 22: a
reference at 2 threads against children at 1 differed in 252 segmentation tensors).

Run as a script, this file is the child process that kills itself at a chosen
point of a `pfadseg train` run (see `kill_hooks`).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CATEGORY, write_dataset
from pfadseg import checkpoint as ckpt
from pfadseg import cli
from pfadseg.trainer import (CHECKPOINT_NAME, STATE_FORMAT, STATE_NAME, Trainer, TrainingError,
                             check_same_images)

STAGE1, STAGE2 = 2, 2
TOTAL = STAGE1 + STAGE2


def train_argv(model: str, root: Path, textures: Path, out: Path, *extra: str) -> list[str]:
    return ["--threads", "1", "train", "--data", str(root), "--category", CATEGORY,
            "--model", model, "--teacher", "efficientnet_lite0", "--preset", "tiny",
            "--image-size", "64", "--stage1-steps", str(STAGE1), "--stage2-steps", str(STAGE2),
            "--save-every", "1", "--no-bf16", "--device", "cpu", "--textures", str(textures),
            "--lr-schedule", "cosine",
            "--out", str(out), *extra]


def loss_rows(out: Path, name: str = "losses.csv") -> list[list[str]]:
    """A CSV log of the run (losses.csv, validation.csv) without its wall-clock column."""
    with open(out / name, newline="") as fh:
        return [row[:-1] for row in csv.reader(fh)]


def state_step(out: Path) -> int:
    _, meta = ckpt.read(out / STATE_NAME, kind=STATE_FORMAT)
    return int(meta["step"])


def assert_same_weights(out: Path, ref: Path) -> None:
    """Every tensor of the final checkpoints is bit-identical, and so is the threshold."""
    got, want = load_file(str(out / CHECKPOINT_NAME)), load_file(str(ref / CHECKPOINT_NAME))
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    meta_got = ckpt.read_meta(out / CHECKPOINT_NAME)
    assert meta_got["threshold"] == ckpt.read_meta(ref / CHECKPOINT_NAME)["threshold"]
    assert meta_got["validation"]["points"] == 3  # the last point's figures travel with the model
    assert json.loads((out / "validation.json").read_text())["final"]["step"] == TOTAL
    assert loss_rows(out) == loss_rows(ref)
    assert loss_rows(out, "validation.csv") == loss_rows(ref, "validation.csv")
    assert [int(r[0]) for r in loss_rows(ref, "validation.csv")[1:]] == [STAGE1, STAGE1 + 1, TOTAL]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root, texture folder) shared by the tests of this module."""
    base = tmp_path_factory.mktemp("resume_data")
    root = write_dataset(base / "mvtec", n_train=8)
    textures = base / "textures"
    textures.mkdir()
    for p in sorted((root / CATEGORY / "test" / "good").iterdir()):
        (textures / p.name).write_bytes(p.read_bytes())
    return root, textures


@pytest.fixture(scope="module")
def threads_restored():
    """The runs here set torch's thread count (`--threads 1`); later tests get theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module",
                params=["destseg", pytest.param("pfadseg", marks=pytest.mark.slow)])
def reference(request, data, threads_restored, tmp_path_factory) -> tuple[str, Path]:
    """(model, out dir) of an uninterrupted run (in-process, same command as the
    interrupted ones). pfadseg's student is twice destseg's, so it runs with -m slow."""
    out = tmp_path_factory.mktemp(f"resume_ref_{request.param}") / "run"
    assert cli.main(train_argv(request.param, *data, out)) == 0
    assert not (out / STATE_NAME).exists()  # a finished run keeps no state file
    return request.param, out


def test_interrupted_run_resumes_bit_exactly(data, reference: tuple[str, Path], tmp_path: Path,
                                              monkeypatch, capsys) -> None:
    """Ctrl-C after step 1 (stage 1) and again after step 3 (stage 2), then finish."""
    model, ref = reference
    out = tmp_path / "run"
    assert cli.main(train_argv(model, *data, out, "--resume")) == 2
    assert "no state file" in capsys.readouterr().err

    real_step = Trainer.train_step
    stop = {"at": 1}

    def interrupted_step(self: Trainer) -> dict:
        if self.step == stop["at"]:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)
    assert cli.main(train_argv(model, *data, out)) == 130
    assert "interrupted; continue with --resume, from step 1 (the last saved)" in capsys.readouterr().err
    assert state_step(out) == 1 and not (out / CHECKPOINT_NAME).exists()

    # a fresh run must not overwrite the unfinished one
    assert cli.main(train_argv(model, *data, out)) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and str(out) in err
    assert state_step(out) == 1

    stop["at"] = 3
    assert cli.main(train_argv(model, *data, out, "--resume")) == 130
    assert state_step(out) == 3
    monkeypatch.setattr(Trainer, "train_step", real_step)
    # a setting the run cannot change half-way is refused, naming it and the run's value
    flag, other = ("--aff", "destseg+aff") if model == "destseg" else ("--no-aff", "destseg+pcar+rcm")
    root, textures = data
    good = (root / CATEGORY / "train" / "good").resolve()
    for extra, words in ((("--stage2-steps", "5"), "--stage2-steps 5 (the run's: 2)"),
                         (("--train-dir", str(textures)),
                          f"--train-dir {textures.resolve()} (the run's: {good})"),
                         ((flag,), f"model {other} (the run's: {model})"),
                         (("--rotation", "small"), "--rotation small (the run's: none)"),
                         # given at their defaults, these were taken as left out
                         (("--preset", "cpu"), "--preset cpu (the run's: tiny)"),
                         (("--model", "pfadseg"), f"model pfadseg (the run's: {model})")):
        if extra == ("--model", model):
            continue
        argv = [*train_argv(model, *data, out, "--resume"), *extra]
        if "--train-dir" in extra:  # in place of --data, which names the images too
            del argv[argv.index("--data"):argv.index("--data") + 2]
        assert cli.main(argv) == 2, extra
        assert words in capsys.readouterr().err
    assert state_step(out) == 3
    # an image added to the folder would shift the held-out split onto trained-on images
    extra_image = good / "zz_new.png"
    extra_image.write_bytes((good / "000.png").read_bytes())
    try:
        assert cli.main(train_argv(model, *data, out, "--resume")) == 2
    finally:
        extra_image.unlink()
    assert "training images changed since the run" in capsys.readouterr().err
    assert state_step(out) == 3
    # options left out come from the run: images, model, schedule, textures (none given here);
    # the teacher's weights too, from the state file (the file named here is never read)
    assert cli.main(["--threads", "1", "train", "--device", "cpu", "--out", str(out), "--resume",
                     "--teacher-weights", str(tmp_path / "gone.pth")]) == 0
    assert not (out / STATE_NAME).exists()
    assert_same_weights(out, ref)
    assert cli.main(train_argv(model, *data, out, "--resume")) == 2  # finished: nothing to resume
    assert "is finished" in capsys.readouterr().err
    seconds = [float(row[-1]) for row in list(csv.reader(open(out / "losses.csv")))[1:]]
    assert seconds == sorted(seconds)  # the wall clock counts on over the resumes
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny" and config["textures"] == str(textures.resolve())
    assert (config["train_dir"], config["category"]) == (str(good), CATEGORY)
    assert config["images"] == sorted(p.name for p in good.iterdir())


def test_resume_refuses_a_changed_image_folder(tmp_path: Path) -> None:
    """The names recorded in config.json must match the images a resumed run loads."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"images": ["a.png", "b.png", "c.png"]}))
    check_same_images(tmp_path, ("a.png", "b.png", "c.png"))
    check_same_images(tmp_path, ())  # TrainData built in Python without names: nothing to compare
    with pytest.raises(TrainingError, match=r"changed since the run .* started: 1 gone \(e\.g\. "
                                            r"b\.png\), 1 new \(e\.g\. d\.png\).*Fix: restore"):
        check_same_images(tmp_path, ("a.png", "c.png", "d.png"))
    config.write_text(json.dumps({"model": {}}))  # a run from before config.json listed its images
    check_same_images(tmp_path, ("x.png",))


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_hooks(where: str, at: int) -> None:
    """Make this process SIGKILL itself at a known point of training, never by timing:
    "step": as step `at` + 1 begins, with the state of step `at` on disk;
    "save": while writing the state of step `at`, its temporary file complete but
    not yet renamed (so the state on disk is the previous one)."""
    if where == "step":
        real_step = Trainer.train_step

        def train_step(self: Trainer) -> dict:
            if self.step == at:
                _kill_self()
            return real_step(self)

        Trainer.train_step = train_step
    elif where == "save":
        real_save = ckpt.save_file

        def save_file(tensors: dict, filename: str, metadata: dict) -> None:
            real_save(tensors, filename, metadata=metadata)
            meta = json.loads(metadata["pfadseg"])
            if meta["format"] == STATE_FORMAT and meta["step"] == at:
                _kill_self()

        ckpt.save_file = save_file
    else:
        raise ValueError(f"kill point {where!r}: use step or save")


KILL_POINTS = [("step", 1),  # in stage 1, student momentum and the teacher-feature cache live
               ("save", 3),  # in stage 2, a stale .tmp and a logged step 3 the state lacks
               pytest.param("step", STAGE1, marks=pytest.mark.slow),  # between the stages
               pytest.param("save", 1, marks=pytest.mark.slow)]  # before any state: start over


@pytest.mark.parametrize("where,at", KILL_POINTS)
def test_killed_process_resumes_bit_exactly(data, reference: tuple[str, Path], tmp_path: Path,
                                            where: str, at: int) -> None:
    """SIGKILL a `pfadseg train` process at a known point, then rerun the command
    (with --resume when it left a state file) in a fresh process."""
    model, ref = reference
    out = tmp_path / "run"
    argv = train_argv(model, *data, out)
    killed = subprocess.run([sys.executable, __file__, where, str(at), *argv],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / CHECKPOINT_NAME).exists()
    saved = at if where == "step" else at - 1  # the kill in a save leaves the previous state
    if saved:
        assert state_step(out) == saved
        assert bool(list(out.glob(STATE_NAME + ".*.tmp"))) == (where == "save")
        argv.append("--resume")
    else:
        assert not (out / STATE_NAME).exists()

    resumed = subprocess.run([sys.executable, "-m", "pfadseg", *argv],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint:" in resumed.stdout
    assert not list(out.glob("*.tmp"))  # the killed save's half-written state is removed
    assert_same_weights(out, ref)


def test_unfinished_run_detection_and_log_trim(tmp_path: Path) -> None:
    """A state short of its schedule is unfinished; a finished one is not; the loss log
    of a resumed run drops the rows a killed run wrote after its last saved state."""
    from pfadseg.config import preset
    from pfadseg.trainer import _continue_log, _unfinished

    train = preset("tiny", stage1_steps=2, stage2_steps=2).to_dict()
    state = tmp_path / STATE_NAME
    for step, unfinished in ((2, True), (4, False)):
        ckpt.atomic_save({"rng": torch.zeros(4, dtype=torch.uint8)},
                         {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION,
                          "step": step, "train": train}, state)
        assert _unfinished(state) is unfinished
    state.write_bytes(b"junk")
    assert _unfinished(state)  # unreadable: refuse to overwrite it blindly

    log, header = tmp_path / "losses.csv", ["step", "stage", "loss"]
    log.write_text("step,stage,loss\n1,1,0.5\n2,1,0.4\n3,2,0.3\n")
    _continue_log(log, header, 2)
    assert log.read_text().splitlines() == ["step,stage,loss", "1,1,0.5", "2,1,0.4"]
    log.write_text("step,stage,loss\n1,1,0.5\n2,1")  # a kill cut the last row short
    kept = _continue_log(log, header, 2)
    assert kept == [{"step": 1, "stage": 1, "loss": 0.5}] and isinstance(kept[0]["step"], int)
    assert log.read_text() == "step,stage,loss\n1,1,0.5\n"  # the next row starts a line
    log.write_text("step,stage,loss\n1,1,abc\n")
    with pytest.raises(TrainingError, match=f"{log}: a value is not a number"):
        _continue_log(log, header, 2)
    # an emptied log (a full disk) starts over with its header; appended rows had none before
    log.write_text("")
    assert _continue_log(log, header, 2) == [] and log.read_text().splitlines() == ["step,stage,loss"]
    log.write_text("3,2,0.3\n4,2,0.2\n")  # rows without the header: named, not read as one
    with pytest.raises(TrainingError, match=f"{log}: its first row is not the header"):
        _continue_log(log, header, 2)


def test_out_folder_states_that_resume_cannot_or_must_finish(tmp_path: Path) -> None:
    """A state file that trained to its end without a checkpoint (killed while writing
    it) asks for --resume, not a new run; an unreadable one names the fix."""
    from pfadseg.config import preset
    from pfadseg.trainer import check_out_dir

    state = tmp_path / STATE_NAME
    ckpt.atomic_save({"rng": torch.zeros(4, dtype=torch.uint8)},
                     {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION, "step": 4,
                      "train": preset("tiny", stage1_steps=2, stage2_steps=2).to_dict()}, state)
    with pytest.raises(TrainingError, match="stopped before writing its checkpoint.*--resume"):
        check_out_dir(tmp_path, resume=False)
    check_out_dir(tmp_path, resume=True)
    state.write_bytes(b"junk")
    with pytest.raises(TrainingError, match=f"Fix: delete {state} to start the run over") as info:
        check_out_dir(tmp_path, resume=True)
    assert ".. Fix" not in str(info.value)


def test_a_damaged_config_json_is_named_not_taken_for_a_run_without_one(tmp_path: Path) -> None:
    """A cut config.json was read as absent, so --resume stopped checking the preset,
    rotation and images against the run, and recorded the new ones as the run's."""
    from pfadseg.config import preset
    from pfadseg.models import ModelConfig
    from pfadseg.trainer import resumed_settings

    ckpt.atomic_save({"rng": torch.zeros(4, dtype=torch.uint8)},
                     {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION, "step": 2,
                      "model": ModelConfig().to_dict(), "train": preset("tiny").to_dict()},
                     tmp_path / STATE_NAME)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"preset": "tiny", "rotation": "none"}))
    with pytest.raises(TrainingError, match="--preset cpu \\(the run's: tiny\\)"):
        resumed_settings(tmp_path, {"preset": "cpu"}, defaults={})
    config.write_text('{"preset": "ti')
    with pytest.raises(TrainingError, match=f"{config}: damaged .*Fix: delete it"):
        resumed_settings(tmp_path, {"preset": "cpu"}, defaults={})
    config.write_text(json.dumps({"category": "bottle/"}))  # as typed, before names were read
    assert resumed_settings(tmp_path, {"category": "bottle"}, defaults={})["category"] == "bottle"
    config.unlink()  # a run from before config.json: only the state's settings are checked
    assert resumed_settings(tmp_path, {"preset": "cpu"}, defaults={})["batch_size"] == preset("tiny").batch_size


def test_torchrun_mismatches_fail_before_the_images_load(tmp_path: Path, monkeypatch) -> None:
    """Under torchrun, a global batch the ranks cannot split and a resume with another
    number of processes were found after every image was decoded and the model built."""
    from pfadseg.models import ModelConfig
    from pfadseg.trainer import resumed_settings, train_folder

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the group is joined later
    monkeypatch.setenv("RANK", "0")
    config = ModelConfig.named("destseg", teacher="efficientnet_lite0", image_size=64)
    with pytest.raises(ValueError, match="batch size 3 does not split over 2 processes"):
        train_folder(config, "tiny", tmp_path / "no_images", tmp_path / "run", schedule={"batch_size": 3})
    monkeypatch.setenv("WORLD_SIZE", "4")  # the cpu preset's 8 images: 2 per rank, too few for AFF
    with pytest.raises(ValueError, match="leaves 2 images per process.*a batch size of 12 or more"):
        train_folder(ModelConfig(teacher="efficientnet_lite0"), "cpu", tmp_path / "no_images", tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ckpt.atomic_save({"rng": torch.zeros(4, dtype=torch.uint8)},
                     {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION, "step": 2,
                      "world_size": 1, "model": config.to_dict(), "train": {}}, tmp_path / STATE_NAME)
    with pytest.raises(TrainingError, match=r"a run of 1 process\(es\), not 2. Fix: resume with the same"):
        resumed_settings(tmp_path, {}, defaults={})


if __name__ == "__main__":  # the killed child: python test_resume.py WHERE STEP PFADSEG-ARGS...
    kill_hooks(sys.argv[1], int(sys.argv[2]))
    sys.exit(cli.main(sys.argv[3:]))


def test_one_training_run_per_folder_at_a_time(tmp_path: Path) -> None:
    """A benchmark killed with -9 left its job training; the rerun started a second
    trainer in the same folder, and both wrote its checkpoint and state file."""
    from pfadseg.trainer import TrainingError, check_out_dir, run_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from pfadseg.trainer import run_lock\n"
         f"with run_lock(pathlib.Path({str(tmp_path)!r})):\n"
         "    print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=f"another pfadseg train is running in it "
                                                f"\\(process {holder.pid}\\)"):
            with run_lock(tmp_path):
                pass
        (tmp_path / STATE_NAME).write_bytes(b"")  # the running one's: said to be running, not stopped
        with pytest.raises(TrainingError, match="another pfadseg train is running in it"):
            check_out_dir(tmp_path, resume=False)
        (tmp_path / STATE_NAME).unlink()
    finally:
        holder.kill()  # as kill -9: the OS releases the lock
        holder.wait()
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
