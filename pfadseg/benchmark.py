"""`pfadseg benchmark`: train and test every (category, variant) pair, then report.

Each pair runs as two subprocesses, ``python -m pfadseg train`` then ``python
-m pfadseg test``, in ``OUT/<category>/<variant>``, with their output in that
folder's ``benchmark.log``: a crash in one pair never stops the others. With
several GPUs, each runs one pair at a time (``CUDA_VISIBLE_DEVICES`` set per
job); otherwise pairs run one after another. A pair is finished when its
``test/metrics.json`` reads as results (a damaged one is tested again), so a rerun
skips it; a pair with a checkpoint is only tested, and an unfinished training run is
continued with ``--resume``. The tables cover every finished pair in ``OUT``,
also those of earlier runs with other categories or variants.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from . import JOB_ENV
from .config import TrainConfig, preset
from .data import DataError, category_name, mvtec_category, not_a_folder, train_image_paths
from .files import write_text
from .models import ModelConfig
from .report import CATEGORIES, read_results, write_report
from .runtime import resolve_device
from .trainer import CHECKPOINT_NAME, STATE_NAME, check_aff_batch
from .variants import ABLATION, MODULES, modules_of

__all__ = ["Job", "Slot", "parse_variants", "find_categories", "device_slots", "plan_jobs",
           "run_jobs", "run_benchmark"]

LOG_NAME = "benchmark.log"
SETTINGS_NAME = "benchmark.json"
# `pfadseg train` options a benchmark hands on to every job: (dest, takes a value)
TRAIN_OPTIONS = (
    ("teacher", True), ("teacher_weights", True), ("textures", True), ("texture_limit", True),
    ("rotation", True), ("preset", True), ("image_size", True), ("batch_size", True),
    ("stage1_steps", True), ("stage2_steps", True), ("lr_student", True), ("lr_schedule", True),
    ("student_checks", True), ("seed", True), ("save_every", True), ("no_bf16", False), ("no_compile", False), ("skip_bad_images", False),
)
TEST_OPTIONS = (("no_bf16", False), ("skip_bad_images", False))
# the train options that change results: a benchmark folder holds pairs trained alike
RESULT_OPTIONS = tuple(o for o in TRAIN_OPTIONS
                       if o[0] not in ("save_every", "no_compile", "skip_bad_images"))
_PATH_OPTIONS = ("teacher_weights", "textures")
ADDED_SETTINGS = ("data",)  # settings that benchmark.json files of older versions lack: taken as equal
SCHEDULE_OPTIONS = ("batch_size", "stage1_steps", "stage2_steps", "lr_student", "lr_schedule",
                    "student_checks", "seed")


@dataclass(frozen=True)
class Job:
    """One (category, variant) pair and its folder."""

    category: str
    variant: str
    folder: Path

    @property
    def metrics(self) -> Path:
        return self.folder / "test" / "metrics.json"

    @property
    def checkpoint(self) -> Path:
        return self.folder / CHECKPOINT_NAME

    @property
    def finished(self) -> bool:
        """Tested, with a readable metrics.json (a damaged one is tested again)."""
        try:
            return bool(read_results(self.metrics))
        except ValueError:
            return False

    @property
    def name(self) -> str:
        return f"{self.category} {self.variant}"


@dataclass(frozen=True)
class Slot:
    """Where one job at a time runs: the child's --device and its environment."""

    device: str
    env: dict[str, str] = field(default_factory=dict)


def parse_variants(text: str) -> list[str]:
    """`ablation` (the 8 module combinations) or a comma list of variant names
    (pfadseg, destseg, destseg+aff, +aff+rcm, ...), as their canonical names."""
    if [part.strip().lower() for part in text.split(",") if part.strip()] == ["ablation"]:
        return list(ABLATION)
    variants: list[str] = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        if name.lower() == "ablation":
            raise ValueError("--variants: ablation stands alone (it is all 8 combinations, destseg "
                             "and pfadseg among them). Fix: --variants ablation")
        modules = modules_of(name)
        if modules is None:
            raise ValueError(f"--variants: unknown variant {name!r}. Fix: use ablation, or a comma "
                             "list of pfadseg, destseg and destseg+<modules> (modules: "
                             f"{', '.join(MODULES)}, e.g. destseg+aff+rcm or +aff+rcm)")
        canonical = ABLATION[[modules_of(v) for v in ABLATION].index(modules)]
        if canonical not in variants:
            variants.append(canonical)
    if not variants:
        raise ValueError("--variants: no variant given. Fix: e.g. --variants pfadseg,destseg")
    return variants


def find_categories(root: Path, text: str) -> tuple[list[str], list[str]]:
    """The categories to run, each checked to hold train/good images and a test folder
    (so a bad layout fails now, not after a training), and, for `all`, the MVTec AD
    categories missing under `root` (a named category that is missing is an error)."""
    root = Path(root)
    layout = "Fix: --data is the dataset root holding <category>/train/good and <category>/test"
    if not root.is_dir():
        raise DataError(f"--data {root}: {not_a_folder(root)}. {layout}")
    if (root / "train" / "good").is_dir():
        raise DataError(f"--data {root} is a category folder. Fix: --data {root.parent}")
    every = text.strip().lower() == "all"
    if every:
        names = [c for c in CATEGORIES if (root / c).is_dir()]
        if not names:
            raise DataError(f"{root}: holds none of the 15 MVTec AD categories. {layout}")
    else:
        names = list(dict.fromkeys(category_name(part) for part in text.split(",") if part.strip()))
        if not names:
            raise ValueError("--categories: none given. Fix: all, or a comma list such as bottle,carpet")
    for name in names:
        path = mvtec_category(root, name)
        train_image_paths(path / "train" / "good")
        if not (path / "test").is_dir():
            raise DataError(f"{path / 'test'}: test folder not found (each pair is tested after "
                            f"its training). {layout}")
    return names, [c for c in CATEGORIES if c not in names] if every else []


def device_slots(device: str, devices: int | None) -> list[Slot]:
    """One slot per GPU used (`devices` of the visible ones, default all) for
    --device auto/cuda; else one slot on that device."""
    name = device.strip().lower()
    if devices is not None and devices < 1:
        raise ValueError(f"--devices {devices}: give 1 or more")
    count = torch.cuda.device_count() if name in ("auto", "cuda") else 0
    if count:
        wanted = devices or count
        if wanted > count:
            raise ValueError(f"--devices {wanted}: only {count} CUDA device(s) visible. Fix: "
                             f"--devices {count} or fewer")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
        return [Slot("cuda", {"CUDA_VISIBLE_DEVICES": ids[i].strip()}) for i in range(wanted)]
    resolved = str(resolve_device(name))  # a clear error for a device that is not there
    if devices not in (None, 1):
        where = "no CUDA GPU is visible" if name == "auto" else f"--device {device} is one device"
        raise ValueError(f"--devices {devices}: {where}, so jobs run one after another. Fix: drop "
                         "--devices, or use --device cuda on a machine with several GPUs")
    return [Slot(resolved)]  # auto as what it is here, in the plan's line and each pair's command


def _options(args: argparse.Namespace, names: tuple[tuple[str, bool], ...]) -> list[str]:
    """Command-line options for the given argparse dests that are set in `args`."""
    argv: list[str] = []
    for dest, takes_value in names:
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flag = "--" + dest.replace("_", "-")
        if not takes_value:
            argv.append(flag)
        else:
            argv += [flag, str(Path(value).resolve()) if dest in _PATH_OPTIONS else str(value)]
    return argv


def _model_options(variant: str) -> list[str]:
    modules = modules_of(variant) or ()
    if modules == MODULES:
        return ["--model", "pfadseg"]
    return ["--model", "destseg"] + [f"--{m}" for m in modules]


def _pfadseg(args: argparse.Namespace) -> list[str]:
    """`python -m pfadseg` with the global options of this run."""
    argv = [sys.executable, "-m", "pfadseg"]
    if getattr(args, "threads", None):
        argv += ["--threads", str(args.threads)]
    if getattr(args, "verbose", False):
        argv.append("-v")
    return argv


def train_argv(job: Job, args: argparse.Namespace, device: str) -> list[str]:
    """The `pfadseg train` command of a job, with --resume when it has a state file
    (then without --save-every: a resumed run keeps its own, and train refuses another)."""
    resume = (job.folder / STATE_NAME).is_file()
    options = tuple(o for o in TRAIN_OPTIONS if not (resume and o[0] == "save_every"))
    argv = _pfadseg(args) + ["train", "--data", str(Path(args.data).resolve()),
                             "--category", job.category, *_model_options(job.variant),
                             *_options(args, options), "--device", device,
                             "--out", str(job.folder)]
    return argv + (["--resume"] if resume else [])


def evaluate_argv(job: Job, args: argparse.Namespace, device: str) -> list[str]:
    """The `pfadseg test` command of a job."""
    return _pfadseg(args) + ["test", "--checkpoint", str(job.checkpoint),
                             "--data", str(Path(args.data).resolve()), "--category", job.category,
                             *_options(args, TEST_OPTIONS), "--device", device,
                             "--out", str(job.metrics.parent), "--overwrite"]  # a test stopped half-way


def plan_jobs(out: Path, categories: list[str], variants: list[str]) -> list[Job]:
    """Every (category, variant) pair under `out`, category by category."""
    out = Path(out).resolve()
    return [Job(c, v, out / c / v) for c in categories for v in variants]


def pair_schedule(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig each pair's `pfadseg train` resolves from the preset and options."""
    return preset(args.preset, **{name: getattr(args, name) for name in SCHEDULE_OPTIONS})


def result_settings(args: argparse.Namespace) -> dict[str, object]:
    """What every pair's results depend on, as train resolves it: an option given
    with the value train takes anyway is the same as one left out."""
    schedule = pair_schedule(args)
    paths = {name: getattr(args, name) and str(Path(getattr(args, name)).resolve())
             for name in _PATH_OPTIONS}
    return json.loads(json.dumps({
        "data": str(Path(args.data).resolve()), "teacher": args.teacher, **paths,
        "texture_limit": args.texture_limit,
        "rotation": args.rotation or "auto", "image_size": args.image_size or ModelConfig.image_size,
        "preset": args.preset, **{name: getattr(schedule, name) for name in SCHEDULE_OPTIONS},
        "bf16": schedule.bf16 and not args.no_bf16}))


def _check_settings(out: Path, args: argparse.Namespace) -> None:
    """Refuse to mix pairs trained with other settings into one benchmark folder
    (naming those that differ); record the settings on first use, and again while
    no pair has trained (a first command that failed early does not bind the folder)."""
    path = Path(out) / SETTINGS_NAME
    now = result_settings(args)
    before = _read_settings(path) if path.is_file() else {}
    if "settings" in before:  # settings older versions did not record are taken as equal
        recorded = {**{name: now[name] for name in ADDED_SETTINGS}, **before["settings"]}
    elif not path.is_file() or before.get("train_options") == _options(args, RESULT_OPTIONS):
        recorded = now  # a new folder, or an older file (the options as given) with these
    else:
        recorded = {}  # an older file with other options
    differ = [f"{name} {now[name]} (the folder's: {recorded.get(name, 'unrecorded')})"
              for name in now if now[name] != recorded.get(name)]
    if differ and any(any(Path(out).glob(f"*/*/{name}")) for name in (CHECKPOINT_NAME, STATE_NAME)):
        raise ValueError(f"{out} holds a benchmark trained with other settings ({path}): "
                         f"{'; '.join(differ)}. Fix: rerun with the same options to continue "
                         "it, or choose another --out")
    if before.get("settings") != now:
        _write_settings(path, now)


def _read_settings(path: Path) -> dict:
    """A benchmark.json as a dict, or an error naming the file and the fix."""
    try:
        data = json.loads(path.read_text())
        ok = isinstance(data, dict) and isinstance(data.get("settings", {}), dict)
        problem = "" if ok else "not a settings object"
    except (OSError, ValueError) as exc:
        problem = str(exc)
    if problem:
        raise ValueError(f"{path}: damaged benchmark settings ({problem}). Fix: delete it to "
                         "record this command's settings (finished pairs are kept and skipped), "
                         "or choose another --out")
    return data


def _write_settings(path: Path, settings: dict) -> None:
    """benchmark.json, replaced whole: an interrupted write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps({"settings": settings}, indent=2) + "\n")


class Progress:
    """Counts of jobs done, failed and left, with an ETA from the jobs run so far."""

    def __init__(self, total: int, done: int, slots: int) -> None:
        self.total, self.done, self.slots = total, done, slots
        self.failed: list[Job] = []
        self.seconds: list[float] = []
        self.lock = threading.Lock()

    def _eta(self) -> str:
        left = self.total - self.done - len(self.failed)
        if not self.seconds or not left:
            return ""
        minutes = sum(self.seconds) / len(self.seconds) * math.ceil(left / self.slots) / 60
        if minutes < 1:
            return ", ETA <1 min"
        return f", ETA {minutes:.0f} min" if minutes < 120 else f", ETA {minutes / 60:.1f} h"

    def say(self, job: Job, what: str) -> None:
        """Print one progress line: counts, ETA, the job and what it does."""
        with self.lock:
            left = self.total - self.done - len(self.failed)
            failed = f", {len(self.failed)} failed" if self.failed else ""
            print(f"[{self.done}/{self.total} done, {left} left{failed}{self._eta()}] "
                  f"{job.name}: {what}", flush=True)

    def finish(self, job: Job, ok: bool, seconds: float) -> None:
        """Count a job as done (and say so) or failed (its runner said why)."""
        with self.lock:
            if ok:
                self.done += 1
                self.seconds.append(seconds)
            else:
                self.failed.append(job)
        if ok:
            self.say(job, f"finished in {seconds / 60:.1f} min")


Runner = Callable[[Job, Slot, Progress], bool]


def run_jobs(jobs: list[Job], slots: list[Slot], runner: Runner, progress: Progress) -> None:
    """Run `runner(job, slot, progress)` for every job, one job per slot at a
    time; a job that fails (False or an exception) leaves the others going.
    An interrupt (Ctrl-C, or `kill -INT` to this process alone; a script's background
    job ignores SIGINT, as shells start them: send it SIGTERM) is passed on to the
    running jobs' subprocesses, which save their state and stop; no new job or
    step starts, and this returns (raising KeyboardInterrupt) once they have ended."""
    pending: queue.SimpleQueue[Job] = queue.SimpleQueue()
    for job in jobs:
        pending.put(job)

    def work(slot: Slot, ended: threading.Event) -> None:
        try:
            while not _STOPPING.is_set():
                try:
                    job = pending.get_nowait()
                except queue.Empty:
                    return
                start = time.perf_counter()
                try:
                    ok = runner(job, slot, progress)
                except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the others
                    progress.say(job, f"failed: {type(exc).__name__}: {exc}")
                    ok = False
                if not _STOPPING.is_set():
                    progress.finish(job, ok, time.perf_counter() - start)
        finally:
            ended.set()

    ended = [threading.Event() for _ in slots]
    for slot, event in zip(slots, ended):
        threading.Thread(target=work, args=(slot, event), daemon=True).start()
    try:
        _wait(ended)
    except KeyboardInterrupt:
        _signal_children(signal.SIGINT)  # a terminal's Ctrl-C reached them too; `kill` did not
        try:
            _wait(ended)  # each stops after its last saved state
        except KeyboardInterrupt:  # a second interrupt: stop them now (SIGTERM would wait as SIGINT does)
            _signal_children(signal.SIGKILL)
            _wait(ended)
        raise
    finally:
        _STOPPING.clear()  # steps started later in this process (a runner called alone) run


def _signal_children(signum: int) -> None:
    """Start no job or step any more, and send `signum` to the running ones."""
    with _LOCK:
        _STOPPING.set()
        for child in _CHILDREN:
            if child.poll() is None:
                child.send_signal(signum)


def _wait(events: list[threading.Event]) -> None:
    """Wait until every event is set. (Not Thread.join: on Python 3.11 a join cut
    short by Ctrl-C can report a running thread as ended.)"""
    for event in events:
        while not event.wait(0.5):
            pass


_CHILDREN: set[subprocess.Popen] = set()  # the jobs' running subprocesses
_STOPPING = threading.Event()  # set on an interrupt: no job or step starts after it
_LOCK = threading.Lock()  # a child starts, or the interrupt reaches all children, at one time


def _run_child(argv: list[str], log: IO[str], env: dict[str, str]) -> int | None:
    """Run one step's subprocess to its end, known to `run_jobs` meanwhile so that an
    interrupt reaches it; returns its exit code, or None when stopping (not started)."""
    with _LOCK:
        if _STOPPING.is_set():
            return None
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**env, JOB_ENV: "1"})
        _CHILDREN.add(child)
    try:
        return child.wait()
    finally:
        with _LOCK:
            _CHILDREN.discard(child)


def _child_env(slot: Slot) -> dict[str, str]:
    """The job's environment: this pfadseg first on the path, the slot's GPU."""
    env = {**os.environ, **slot.env}
    source = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    return env


def subprocess_runner(args: argparse.Namespace) -> Runner:
    """Runs a job as `pfadseg train` (unless its checkpoint exists) then
    `pfadseg test`, each a subprocess writing to the job's log file."""
    def run(job: Job, slot: Slot, progress: Progress) -> bool:
        job.folder.mkdir(parents=True, exist_ok=True)
        log_path = job.folder / LOG_NAME
        steps = [] if job.checkpoint.is_file() else [("train", train_argv(job, args, slot.device))]
        steps.append(("test", evaluate_argv(job, args, slot.device)))
        for step, argv in steps:
            resuming = " (resuming)" if "--resume" in argv else ""
            where = f" on GPU {slot.env['CUDA_VISIBLE_DEVICES']}" if slot.env else ""
            progress.say(job, f"{step}{resuming}{where}...")
            with open(log_path, "a") as log:
                env = "".join(f"{k}={v} " for k, v in slot.env.items())
                log.write(f"\n$ {env}{' '.join(argv)}\n")
                log.flush()
                code = _run_child(argv, log, _child_env(slot))
            if _STOPPING.is_set():
                progress.say(job, f"{step} stopped by the interrupt")
                return False
            if code != 0:
                retrain = (f"; if its checkpoint is damaged, delete {job.folder} and rerun to train "
                           "it again" if step == "test" and len(steps) == 1 else "")
                progress.say(job, f"{step} failed (exit code {code}); see {log_path}{retrain}")
                return False
        return True
    return run


def run_benchmark(args: argparse.Namespace) -> int:
    """`pfadseg benchmark`: plan, run the unfinished pairs, write the report.
    Returns 0 when every pair finished, 1 when some failed."""
    from .cli import check_run_paths, out_folder  # here: the CLI imports this module

    categories, missing = find_categories(args.data, args.categories)
    check_run_paths(args.textures, args.texture_limit, args.teacher_weights)
    variants = parse_variants(args.variants)
    schedule = pair_schedule(args)
    check_aff_batch(any("aff" in (modules_of(v) or ()) for v in variants), schedule.batch_size,
                    schedule, "variants without AFF")  # each pair trains in one process
    slots = device_slots(args.device, args.devices)
    out = out_folder(Path(args.out).resolve())
    _check_settings(out, args)
    jobs = plan_jobs(out, categories, variants)
    todo = [job for job in jobs if not job.finished]
    if missing:
        print(f"{len(categories)} of {len(CATEGORIES)} MVTec AD categories under {args.data}; "
              f"missing: {', '.join(missing)}")
    where = (f"{len(slots)} GPUs, one job each" if len(slots) > 1
             else "one after another on " + (f"GPU {slots[0].env['CUDA_VISIBLE_DEVICES']}"
                                             if slots[0].env else slots[0].device))
    print(f"{len(jobs)} pairs ({len(categories)} categories x {len(variants)} variants): "
          f"{len(jobs) - len(todo)} finished, {len(todo)} to run, {where}; logs in "
          f"{out}/<category>/<variant>/{LOG_NAME}", flush=True)
    progress = Progress(len(jobs), len(jobs) - len(todo), len(slots))
    run_jobs(todo, slots, subprocess_runner(args), progress)  # `kill PID`: as Ctrl-C (cli.main)

    # the report covers every pair the folder holds: a rerun with fewer variants or
    # categories keeps the others in the tables
    held = [Job(path.parents[2].name, path.parents[1].name, path.parents[1])
            for path in sorted(out.glob("*/*/test/metrics.json"))]
    pairs = {job.folder: job for job in jobs + held}
    finished = {folder: job for folder, job in pairs.items() if job.finished}  # each read once
    results = [job.metrics for job in finished.values()]
    if progress.failed:
        print(f"{len(progress.failed)} pair(s) failed: " + "; ".join(
            f"{job.name} ({job.folder / LOG_NAME})" for job in progress.failed)
              + ". Fix what the log says, then rerun the same command to continue.", file=sys.stderr)
    if not results:
        print("no finished pair to report")
        return 1
    paths = write_report(results, out / "report")
    print(paths[0].read_text())
    done = sum(job.folder in finished for job in jobs)
    print(f"tables ({len(results)} finished pair(s) in {out}, {done} of this command's {len(jobs)}): "
          f"{' '.join(map(str, paths))}")
    return 1 if progress.failed else 0
