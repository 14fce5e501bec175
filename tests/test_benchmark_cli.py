"""`pfadseg benchmark`: the CI check on the bundled sample, resuming, failures, the
Table 4 layout, devices and the pieces of the job runner."""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pfadseg import benchmark
from pfadseg.benchmark import (Job, Progress, Slot, device_slots, find_categories, parse_variants,
                               plan_jobs, run_jobs, subprocess_runner, evaluate_argv, train_argv)
from pfadseg.cli import build_parser, main
from pfadseg.config import PRESETS
from pfadseg.data import DataError
from pfadseg.demo import demo_root
from pfadseg.models import ModelConfig
from pfadseg.report import CATEGORIES
from pfadseg.variants import ABLATION, modules_of

CI_ARGS = ["benchmark", "--data", str(demo_root()), "--categories", "bottle", "--variants", "destseg",
           "--teacher", "efficientnet_lite0", "--preset", "tiny", "--image-size", "64",
           "--device", "cpu"]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CI check: one tiny destseg pair on the bundled bottle sample, trained and tested."""
    out = tmp_path_factory.mktemp("bench")
    assert main(CI_ARGS + ["--out", str(out)]) == 0
    return out


def test_ci_check_trains_tests_and_writes_the_table(ci_run: Path) -> None:
    pair = ci_run / "bottle" / "destseg"
    metrics = json.loads((pair / "test" / "metrics.json").read_text())
    assert metrics["category"] == "bottle" and metrics["variant"] == "destseg"
    log = (pair / "benchmark.log").read_text()
    assert "-m pfadseg train" in log and "--model destseg" in log and "--device cpu" in log
    assert "-m pfadseg test" in log
    rows = list(csv.DictReader(open(ci_run / "report" / "results.csv")))
    assert rows[0]["category"] == "bottle"
    assert rows[0]["P-AP"] == f"{100 * metrics['pixel_ap']:.1f}"
    assert "## Table 1: results per category" in (ci_run / "report" / "results.md").read_text()


def test_rerun_skips_finished_pairs(ci_run: Path, capsys: pytest.CaptureFixture) -> None:
    log = (ci_run / "bottle" / "destseg" / "benchmark.log").read_text()
    assert main(CI_ARGS + ["--out", str(ci_run)]) == 0
    out = capsys.readouterr().out
    assert "1 finished, 0 to run" in out and "| bottle |" in out
    assert (ci_run / "bottle" / "destseg" / "benchmark.log").read_text() == log  # nothing ran


def test_rerun_with_other_training_options_is_refused(ci_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(CI_ARGS + ["--out", str(ci_run), "--seed", "7", "--rotation", "small"]) == 2
    err = capsys.readouterr().err
    assert "trained with other settings" in err and "another --out" in err
    assert "rotation small (the folder's: auto); seed 7 (the folder's: 0)" in err
    # the preset's own values given explicitly, or an older benchmark.json that listed the
    # options as given, are the same settings
    tiny = PRESETS["tiny"]
    same = ["--batch-size", str(tiny.batch_size), "--seed", str(tiny.seed), "--rotation", "auto"]
    assert main(CI_ARGS + ["--out", str(ci_run), *same]) == 0
    assert "1 finished, 0 to run" in capsys.readouterr().out
    settings = ci_run / "benchmark.json"
    recorded = settings.read_text()
    args = build_parser().parse_args(CI_ARGS + ["--out", str(ci_run)])
    settings.write_text(json.dumps({"train_options": benchmark._options(args, benchmark.RESULT_OPTIONS)}))
    assert main(CI_ARGS + ["--out", str(ci_run)]) == 0
    assert settings.read_text() == recorded
    # other data: its results would be reported as the folder's (a rerun said "1 finished")
    other = ci_run.parent / "other_data"
    other.mkdir(exist_ok=True)
    (other / "bottle").symlink_to(demo_root() / "bottle")
    assert main([a if a != str(demo_root()) else str(other) for a in CI_ARGS] + ["--out", str(ci_run)]) == 2
    assert f"data {other.resolve()} (the folder's: {demo_root().resolve()})" in capsys.readouterr().err
    # a file of a version that did not record the data: the same settings, now recorded
    older = json.loads(recorded)
    del older["settings"]["data"]
    settings.write_text(json.dumps(older))
    assert main(CI_ARGS + ["--out", str(ci_run)]) == 0
    assert settings.read_text() == recorded
    for damaged in ("", "[]", '{"settings": null}'):  # a traceback or a bare JSON error before
        settings.write_text(damaged)
        assert main(CI_ARGS + ["--out", str(ci_run)]) == 2
        err = capsys.readouterr().err
        assert f"{settings}: damaged benchmark settings" in err and "Fix: delete it" in err
    settings.write_text(recorded)


def test_settings_bind_a_folder_only_once_a_pair_trained(tmp_path: Path, capsys) -> None:
    """A first command whose pairs all failed before training (a wrong --textures) locked
    the folder to its settings: the fixed command was refused."""
    wrong = build_parser().parse_args(CI_ARGS + ["--out", str(tmp_path), "--textures", str(tmp_path / "x")])
    benchmark._check_settings(tmp_path, wrong)
    right = build_parser().parse_args(CI_ARGS + ["--out", str(tmp_path)])
    benchmark._check_settings(tmp_path, right)  # nothing trained: the settings are replaced
    assert json.loads((tmp_path / "benchmark.json").read_text())["settings"]["textures"] is None
    (tmp_path / "bottle" / "destseg").mkdir(parents=True)
    (tmp_path / "bottle" / "destseg" / "train_state.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="trained with other settings"):
        benchmark._check_settings(tmp_path, wrong)
    (tmp_path / "a_file").write_text("")
    assert main(CI_ARGS + ["--out", str(tmp_path / "a_file")]) == 2
    assert f"--out {tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().err


def test_failed_pair_leaves_the_others_and_names_its_log(ci_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "bottle").symlink_to(demo_root() / "bottle")
    _category(data / "broken", b"not a png")  # an unreadable training image: train fails
    out = tmp_path / "bench"
    shutil.copytree(ci_run / "bottle", out / "bottle")  # a finished pair
    args = [a if a != str(demo_root()) else str(data) for a in CI_ARGS]
    args[args.index("bottle")] = "broken,bottle"
    assert main(args + ["--out", str(out)]) == 1
    printed = capsys.readouterr()
    log = out / "broken" / "destseg" / "benchmark.log"
    assert "broken destseg: train failed (exit code 2)" in printed.out
    assert f"1 pair(s) failed: broken destseg ({log})" in printed.err
    assert "000.png" in log.read_text()
    rows = list(csv.DictReader(open(out / "report" / "results.csv")))
    assert [row["category"] for row in rows][:1] == ["bottle"]


def test_ablation_writes_table4_from_finished_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--variants ablation` on pairs whose metrics.json exist: nothing trains, Table 4 is written."""
    out = tmp_path / "bench"
    for i, variant in enumerate(ABLATION):
        path = out / "bottle" / variant / "test" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"category": "bottle", "variant": variant,
                                    "image_auroc": 0.5 + 0.05 * i, "pixel_ap": 0.1 + 0.01 * i}))
    args = [a if a != "destseg" else "ablation" for a in CI_ARGS]
    assert main(args + ["--out", str(out)]) == 0
    assert "8 finished, 0 to run" in capsys.readouterr().out
    table4 = list(csv.reader(open(out / "report" / "variants.csv")))
    assert table4[0] == ["Variant", "RCM", "AFF", "PCAR", "I-AUROC", "P-AP"]
    assert [row[0] for row in table4[1:]] == list(ABLATION)
    assert table4[6] == ["destseg+aff+pcar", "", "✓", "✓", "75.0", "15.0"]
    markdown = (out / "report" / "results.md").read_text()
    assert "## Table 4: variants (bottle only)" in markdown
    assert "| pfadseg | ✓ | ✓ | ✓ | 85.0 | 17.0 |" in markdown
    # a rerun with one variant keeps the folder's other pairs in the tables
    assert main(CI_ARGS + ["--out", str(out)]) == 0
    assert "tables (8 finished pair(s) in" in capsys.readouterr().out
    assert [row[0] for row in csv.reader(open(out / "report" / "variants.csv"))][1:] == list(ABLATION)


@pytest.mark.slow
def test_ablation_trains_all_eight_combinations(tmp_path: Path) -> None:
    args = [a if a != "destseg" else "ablation" for a in CI_ARGS]
    assert main(args + ["--out", str(tmp_path)]) == 0
    for variant in ABLATION:
        metrics = json.loads((tmp_path / "bottle" / variant / "test" / "metrics.json").read_text())
        assert metrics["variant"] == variant
    assert len(list(csv.reader(open(tmp_path / "report" / "variants.csv")))) == 9


def test_help_lists_the_options(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    text = capsys.readouterr().out
    for option in ("--data", "--categories", "--variants", "--preset", "--out", "--teacher",
                   "--textures", "--devices", "--device", "--teacher-weights", "--texture-limit",
                   "--image-size", "--batch-size", "--stage1-steps", "--stage2-steps", "--seed",
                   "--no-bf16", "--no-compile"):
        assert option in text


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["benchmark", "--data", "d", "--out", "o", *argv])


def test_commands_pass_options_through(tmp_path: Path) -> None:
    args = parse("--teacher", "efficientnet_lite0", "--textures", "tex", "--texture-limit", "5",
                 "--preset", "tiny", "--image-size", "64", "--batch-size", "4", "--stage1-steps", "3",
                 "--stage2-steps", "2", "--seed", "1", "--no-bf16", "--no-compile")
    job = Job("bottle", "destseg+aff+rcm", tmp_path / "bottle" / "destseg+aff+rcm")
    train = train_argv(job, args, "cuda")
    assert train[1:5] == ["-m", "pfadseg", "train", "--data"]
    text = " ".join(train)
    assert "--model destseg --aff --rcm " in text and "--pcar" not in text
    assert (f"--teacher efficientnet_lite0 --textures {Path('tex').resolve()} --texture-limit 5 "
            "--preset tiny --image-size 64 --batch-size 4 --stage1-steps 3 --stage2-steps 2 "
            "--seed 1 --no-bf16 --no-compile --device cuda") in text
    assert train[-2:] == ["--out", str(job.folder)]
    test = " ".join(evaluate_argv(job, args, "cuda"))
    assert f"--checkpoint {job.folder / 'checkpoint.safetensors'}" in test
    assert f"--no-bf16 --device cuda --out {job.folder / 'test'}" in test
    assert "--model pfadseg" in " ".join(train_argv(Job("bottle", "pfadseg", job.folder), args, "cpu"))
    # a pair stopped half-way resumes with its own save points: train refuses another --save-every
    saving = parse("--save-every", "3")
    assert "--save-every 3" in " ".join(train_argv(job, saving, "cpu"))
    job.folder.mkdir(parents=True)
    (job.folder / "train_state.safetensors").write_bytes(b"")
    resumed = train_argv(job, saving, "cpu")
    assert resumed[-1] == "--resume" and "--save-every" not in resumed


def test_variant_names() -> None:
    assert parse_variants("ablation") == parse_variants(" Ablation,") == list(ABLATION)
    assert parse_variants("pfadseg, destseg,+rcm+aff,destseg") == ["pfadseg", "destseg", "destseg+aff+rcm"]
    with pytest.raises(ValueError, match="unknown variant 'patchcore'"):
        parse_variants("pfadseg,patchcore")
    with pytest.raises(ValueError, match="ablation stands alone"):  # was: "unknown variant 'ablation'"
        parse_variants("ablation,destseg")
    # The names are the ones the model gives its own variant (metrics.json's "variant").
    for name in ABLATION:
        flags = {m: m in modules_of(name) for m in ("aff", "pcar", "rcm")}
        assert ModelConfig(**flags).variant == name


def test_category_option_reads_a_completed_folder_name(capsys) -> None:
    from pfadseg.cli import build_parser, main

    for command in (["train", "--out", "o"], ["test", "--checkpoint", "c.safetensors", "--out", "o"]):
        assert build_parser().parse_args([*command, "--category", "./bottle/"]).category == "bottle"
    with pytest.raises(SystemExit) as exited:
        main(["train", "--data", "d", "--category", "a/b", "--out", "o"])
    assert exited.value.code == 2
    assert "'a/b' is not a category name" in capsys.readouterr().err


def _category(folder: Path, image: bytes = b"") -> Path:
    """A category folder in the MVTec layout: train/good/000.png and an empty test/."""
    (folder / "train" / "good").mkdir(parents=True)
    (folder / "train" / "good" / "000.png").write_bytes(image)
    (folder / "test").mkdir()
    return folder


def test_all_categories_lists_the_missing_ones(tmp_path: Path) -> None:
    for name in ("wood", "bottle", "not_mvtec"):
        _category(tmp_path / name)
    found, missing = find_categories(tmp_path, "all")
    assert found == ["wood", "bottle"]
    assert len(missing) == 13 and "carpet" in missing and "wood" not in missing
    assert find_categories(tmp_path, "bottle, not_mvtec") == (["bottle", "not_mvtec"], [])
    # as the shell completes them: one category, its MVTec name (was "bottle/", rotation none)
    assert find_categories(tmp_path, "bottle/,./bottle") == (["bottle"], [])
    with pytest.raises(ValueError, match="'bottle/train' is not a category name"):
        find_categories(tmp_path, "bottle/train")
    with pytest.raises(DataError, match="nope: category folder not found"):
        find_categories(tmp_path, "bottle,nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="none of the 15 MVTec AD categories"):
        find_categories(tmp_path / "other", "all")
    assert len(CATEGORIES) == 15


def test_a_bad_layout_or_path_stops_before_any_training(tmp_path: Path, capsys) -> None:
    """Each pair found these only when its training or test ran (a whole training wasted,
    the cause in the pair's log alone); now the command names them before any work."""
    with pytest.raises(DataError, match=r"--data .*nowhere: folder not found. Fix: --data is the dataset root"):
        find_categories(tmp_path / "nowhere", "all")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"--data .*a_file: a file, not a folder. Fix:"):
        find_categories(tmp_path / "a_file", "all")
    bottle = _category(tmp_path / "bottle")
    with pytest.raises(DataError, match=f"--data {bottle} is a category folder. Fix: --data {tmp_path}"):
        find_categories(bottle, "all")
    (bottle / "test").rmdir()
    with pytest.raises(DataError, match=r"bottle/test: test folder not found \(each pair is tested"):
        find_categories(tmp_path, "bottle")
    (bottle / "train" / "good" / "000.png").unlink()
    with pytest.raises(DataError, match="bottle/train/good: no training images"):
        find_categories(tmp_path, "all")
    for option in ("--textures", "--teacher-weights"):
        out = tmp_path / option
        assert main(CI_ARGS + ["--out", str(out), option, str(tmp_path / "missing")]) == 2
        assert f"{tmp_path / 'missing'}" in capsys.readouterr().err
        assert not out.exists()  # checked before the folder is made
    aff = [a if a != "destseg" else "destseg,+aff" for a in CI_ARGS]  # AFF unclipped at batch 2
    assert main(aff + ["--preset", "demo", "--batch-size", "2", "--out", str(tmp_path / "aff")]) == 2
    assert "Fix: a batch size of 3 or more (--batch-size), or variants without AFF" in capsys.readouterr().err
    assert not (tmp_path / "aff").exists()


def test_device_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_slots("cpu", None) == [Slot("cpu")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_slots("auto", None) == [Slot("cpu")]  # named as what it is, in the plan's line
    with pytest.raises(ValueError, match="jobs run one after another"):
        device_slots("cpu", 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert device_slots("auto", None) == [Slot("cuda", {"CUDA_VISIBLE_DEVICES": i}) for i in "456"]
    assert device_slots("cuda", 2) == [Slot("cuda", {"CUDA_VISIBLE_DEVICES": i}) for i in "45"]
    with pytest.raises(ValueError, match="only 3 CUDA device"):
        device_slots("cuda", 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert device_slots("auto", 2) == [Slot("cuda", {"CUDA_VISIBLE_DEVICES": i}) for i in "01"]


def test_jobs_run_one_per_slot_concurrently_and_survive_failures(tmp_path: Path) -> None:
    jobs = plan_jobs(tmp_path, ["a", "b", "c"], ["destseg", "pfadseg"])
    slots = [Slot("cuda", {"CUDA_VISIBLE_DEVICES": "0"}), Slot("cuda", {"CUDA_VISIBLE_DEVICES": "1"})]
    both_busy = threading.Barrier(2, timeout=60)  # the first two jobs must overlap
    ran: list[tuple[str, str]] = []
    started = iter(range(len(jobs)))  # next() is atomic under the GIL

    def runner(job: Job, slot: Slot, progress: Progress) -> bool:
        if next(started) < 2:
            both_busy.wait()
        ran.append((job.name, slot.env["CUDA_VISIBLE_DEVICES"]))
        if job.category == "b" and job.variant == "destseg":
            raise RuntimeError("boom")
        return job.category != "c" or job.variant != "pfadseg"

    progress = Progress(len(jobs), 0, len(slots))
    run_jobs(jobs, slots, runner, progress)
    assert sorted(name for name, _ in ran) == sorted(job.name for job in jobs)
    assert {gpu for _, gpu in ran} == {"0", "1"}
    assert progress.done == 4
    assert sorted(job.name for job in progress.failed) == ["b destseg", "c pfadseg"]


def test_progress_lines_count_jobs_and_estimate_the_time_left(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    jobs = plan_jobs(tmp_path, ["bottle", "tile"], ["pfadseg", "destseg"])
    progress = Progress(total=10, done=2, slots=2)  # 2 pairs finished before this run
    progress.say(jobs[0], "train...")
    progress.finish(jobs[0], True, 120.0)
    progress.finish(jobs[1], True, 240.0)
    progress.finish(jobs[2], False, 5.0)
    progress.say(jobs[3], "test...")
    assert capsys.readouterr().out.splitlines() == [
        "[2/10 done, 8 left] bottle pfadseg: train...",
        "[3/10 done, 7 left, ETA 8 min] bottle pfadseg: finished in 2.0 min",
        "[4/10 done, 6 left, ETA 9 min] bottle destseg: finished in 4.0 min",
        "[4/10 done, 5 left, 1 failed, ETA 9 min] tile destseg: test...",
    ]


def test_runner_tests_a_trained_pair_and_resumes_an_unfinished_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    calls: list[list[str]] = []

    def fake_run(argv: list[str], log: object, env: dict[str, str]) -> int:
        calls.append(argv)
        assert env["CUDA_VISIBLE_DEVICES"] == "3"
        return 1 if "broken" in argv else 0

    monkeypatch.setattr(benchmark, "_run_child", fake_run)
    run = subprocess_runner(parse("--preset", "tiny"))
    slot = Slot("cuda", {"CUDA_VISIBLE_DEVICES": "3"})
    progress = Progress(3, 0, 1)
    trained, unfinished, broken = plan_jobs(tmp_path, ["bottle", "tile", "broken"], ["pfadseg"])
    trained.folder.mkdir(parents=True)
    trained.checkpoint.write_bytes(b"")
    unfinished.folder.mkdir(parents=True)
    (unfinished.folder / "train_state.safetensors").write_bytes(b"")

    assert not trained.finished
    trained.metrics.parent.mkdir()
    trained.metrics.write_text('{"category": "bottle", "varia')  # cut short: tested again
    assert not trained.finished
    assert run(trained, slot, progress)
    assert [argv[3] for argv in calls] == ["test"]
    calls.clear()
    assert run(unfinished, slot, progress)
    assert [argv[3] for argv in calls] == ["train", "test"] and calls[0][-1] == "--resume"
    calls.clear()
    assert not run(broken, slot, progress)
    assert [argv[3] for argv in calls] == ["train"] and "--resume" not in calls[0]
    printed = capsys.readouterr().out
    assert "tile pfadseg: train (resuming) on GPU 3..." in printed
    assert f"broken pfadseg: train failed (exit code 1); see {broken.folder / 'benchmark.log'}" in printed
    assert "$ CUDA_VISIBLE_DEVICES=3 " in (broken.folder / "benchmark.log").read_text()
    calls.clear()
    broken.checkpoint.write_bytes(b"")  # trained, and its test fails: the way out is said
    assert not run(broken, slot, progress)
    assert [argv[3] for argv in calls] == ["test"]
    assert (f"broken pfadseg: test failed (exit code 1); see {broken.folder / 'benchmark.log'}; if its "
            f"checkpoint is damaged, delete {broken.folder} and rerun") in capsys.readouterr().out


def test_an_interrupt_to_the_parent_alone_stops_the_running_job(tmp_path: Path) -> None:
    """`kill -INT PID` reaches only the benchmark, not its job: the job is stopped too
    (before, it ran on alone and a rerun wrote the same folder beside it)."""
    def runner(job: Job, slot: Slot, progress: Progress) -> bool:
        with open(tmp_path / "log", "w") as log:  # two steps, as train then test
            codes.append(benchmark._run_child([sys.executable, "-c", "import time; time.sleep(120)"],
                                              log, dict(os.environ)))
            codes.append(benchmark._run_child([sys.executable, "-c", "pass"], log, dict(os.environ)))
        return False

    def interrupt_when_the_job_runs() -> None:
        for _ in range(600):
            if benchmark._CHILDREN:
                seen.extend(benchmark._CHILDREN)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    seen: list = []
    codes: list = []
    watcher = threading.Thread(target=interrupt_when_the_job_runs)
    watcher.start()
    jobs = plan_jobs(tmp_path, ["bottle"], ["destseg"])
    # Ctrl-C's handler, as in a terminal: pytest started in the background by a script
    # inherits SIGINT ignored, and the interrupt would do nothing
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_jobs(jobs, [Slot("cpu", {})], runner, Progress(1, 0, 1))
    finally:
        signal.signal(signal.SIGINT, before)
    watcher.join()
    assert len(seen) == 1 and seen[0].poll() is not None  # stopped, not orphaned
    assert not benchmark._CHILDREN
    # run_jobs returned after the job's runner did, and its next step never started
    assert codes[0] is not None and codes[1] is None
    assert not benchmark._STOPPING.is_set()  # a step started afterwards in this process runs


def test_a_job_heeds_the_interrupt_passed_on_even_where_sigint_was_ignored(monkeypatch) -> None:
    """A benchmark started in the background by a script runs with SIGINT ignored, and so
    do its jobs: `python -m pfadseg` restores Ctrl-C's handler first thing in a job (before
    its imports), or the interrupt passed on would do nothing."""
    import pfadseg

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pfadseg.heed_interrupts()  # not a job: left as it was
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        monkeypatch.setenv(pfadseg.JOB_ENV, "1")
        pfadseg.heed_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    main_py = (Path(pfadseg.__file__).parent / "__main__.py").read_text()
    assert main_py.index("heed_interrupts()") < main_py.index("from .cli import main")
