"""The `pfadseg` command: train, test, predict, calibrate, export, report, benchmark, demo and serve."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from . import distributed as dist
from .calibration import DEFAULT_FALSE_ALARM_RATE, DEFAULT_PIXEL_FALSE_ALARM_RATE, FEW_GOOD_IMAGES
from .checkpoint import STATE_FORMAT, CheckpointError, load_checkpoint, read_meta
from .config import LR_SCHEDULES, PRESETS
from .data import (IMAGE_SUFFIXES, DataError, category_name, list_test_images, load_textures,
                   mvtec_category, texture_paths, train_image_paths)
from .models import TEACHERS, ModelConfig, TeacherWeightsError
from .models.teacher import RANDOM
from .predict import PER_IMAGE
from .runtime import DEVICE_HELP, cpu_heap_settings, device_name, place, resolve_device
from .synthesis import DefectSynthesizer, procedural_textures
from .trainer import (RESUMED, ROTATIONS, STATE_NAME, VALIDATION_JSON, TrainingError, check_out_dir,
                      resumed_settings, train_folder)
from .variants import MODULES

log = logging.getLogger("pfadseg")
COMPILE_HELP = ("compile the model with torch.compile (on a CPU Inductor, which needs a C++ "
                "compiler; on one GPU CUDA graphs): on a CPU one to three minutes of compiling "
                "first, and a 2-core CPU's predict gained under 10%% "
                "per image (docs/results.md)")


def whole_number(minimum: int, maximum: int | None = None, why: str = "") -> Callable[[str], int]:
    """argparse type: a whole number of `minimum` or more (and at most `maximum`, for `why`)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {minimum} or more")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is over {maximum} ({why})")
        return value
    return parse


positive_int = whole_number(1)  # batch sizes, counts
non_negative_int = whole_number(0)  # numbers of steps
port = whole_number(0, 65535, "the highest TCP port")  # 0: any free port
RESULT_FILES = ("metrics.json", "metrics.md", "report.html", "summary.csv", "summary.json")
OVERWRITE_HELP = "replace the results of an earlier test or predict run in --out (else refused)"
MAX_EVAL_SIZE = 8192  # an 8192 x 8192 float32 map is 256 MiB, and test keeps one per image


def user_path(text: str) -> Path:
    """argparse type: a path with ~ expanded, which the shell leaves in --out=~/runs
    (else the results would go to a folder named "~")."""
    return Path(text).expanduser()


def category(text: str) -> str:
    """argparse type: a category's folder name, as data.category_name reads it."""
    try:
        return category_name(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def image_size(text: str) -> int:
    """argparse type: an input size the model takes, a multiple of 32 pixels."""
    value = whole_number(32)(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"{text!r} is not a multiple of 32 (the networks "
                                         f"downsample by 32); e.g. {max(round(value / 32), 1) * 32}")
    return value


def number(within: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """argparse type: a number for which `within` holds, described as `what`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not within(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


positive_number = number(lambda v: 0.0 < v < float("inf"), "a number above 0")  # size limits
# thresholds on probabilities, and rates
probability = number(lambda v: 0.0 < v < 1.0, "a number between 0 and 1 (0 or 1 would flag "
                                               "every image or none)")


def out_folder(path: Path) -> Path:
    """--out of a command that writes a folder: created now, before any work, so a
    path that cannot be one fails at once rather than after the work is done."""
    if path.exists() and not path.is_dir():
        raise DataError(f"--out {path} is a file, not a folder. Fix: give a folder (created if "
                        "missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--out {path}: cannot create it ({exc.strerror}). Fix: give a folder "
                        "you can write to.") from exc
    try:  # else a read-only folder would fail only when the results are written
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise DataError(f"--out {path}: cannot write there ({exc.strerror}). Fix: give a folder "
                        "you can write to.") from exc
    return path


def results_folder(path: Path, overwrite: bool) -> Path:
    """--out of `test` and `predict`: as `out_folder`, and refused when it holds an
    earlier run's results (either command's: both write report.html) unless `overwrite`."""
    out_folder(path)
    held = [name for name in RESULT_FILES if (path / name).is_file()]
    found = next((p for suffix in PER_IMAGE for p in path.glob(f"*{suffix}")), None)
    if found is not None:
        held.append(f"per-image files such as {found.name}")
    if held and not overwrite:
        raise DataError(f"--out {path} holds the results of an earlier run ({', '.join(held)}). "
                        "Fix: give a new --out, or add --overwrite to replace them.")
    return path


def out_file(path: Path, example: str) -> Path:
    """--out of a command that writes one file: checked before any work."""
    if path.is_dir():
        raise DataError(f"--out {path} is a folder. Fix: give a file name, e.g. {path / example}.")
    out_folder(path.parent)
    return path


def _add_run_args(data: argparse._ArgumentGroup, model: argparse._ArgumentGroup,
                  schedule: argparse._ArgumentGroup) -> None:
    """The options of one training run that `pfadseg benchmark` hands on to each pair's
    `pfadseg train`: synthetic defects, teacher, input size and schedule."""
    data.add_argument("--textures", type=user_path,
                      help="folder of texture images for synthetic defects (DTD images/); "
                           "default: built-in procedural textures")
    data.add_argument("--texture-limit", type=positive_int,
                      help="use at most this many texture images, evenly spaced (default: all; "
                           "without --textures: how many procedural ones, 64)")
    data.add_argument("--rotation", choices=ROTATIONS, default="auto",
                      help="rotation augmentation of the good images; auto = the official "
                           "per-category choice by the category name, none for other names "
                           "(default: %(default)s)")
    data.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    model.add_argument("--teacher", choices=sorted(TEACHERS), default="resnet18",
                       help="frozen ImageNet teacher: resnet18 (the paper's; its weights are "
                            "downloaded once) or efficientnet_lite0 (weights installed with "
                            "pfadseg, works offline) (default: %(default)s)")
    model.add_argument("--teacher-weights", type=user_path,
                       help="local teacher weights file (no download needed)")
    model.add_argument("--image-size", type=image_size, default=256,
                       help="input size in pixels, a multiple of 32: images are resized to N x N "
                            "(default: %(default)s)")
    schedule.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                          help="training schedule: paper (PFADSeg paper, 3000 + 4000 steps), "
                               "official (DeSTSeg code, 1000 + 4000), cpu (fits a 2-core CPU), "
                               "demo (the bundled sample), tiny (2 + 2 steps; smoke tests) "
                               "(default: %(default)s)")
    schedule.add_argument("--batch-size", type=positive_int,
                          help="training batch size (default: the preset's)")
    schedule.add_argument("--stage1-steps", type=non_negative_int,
                          help="student (denoising) steps (default: the preset's)")
    schedule.add_argument("--stage2-steps", type=non_negative_int,
                          help="segmentation-net steps (default: the preset's)")
    schedule.add_argument("--lr-student", type=float,
                          help="student learning rate (default: the preset's)")
    schedule.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                          help="learning rates per stage: constant (the papers; every preset) or "
                               "cosine (decay to near zero by the stage's end) (default: the "
                               "preset's)")
    schedule.add_argument("--student-checks", type=int,
                          help="validate the student this many times over stage 1's second half "
                               "and train stage 2 on the best one; 0 or 1: the last one (default: "
                               "the preset's: 4 for cpu and demo, 0 for paper and official)")
    schedule.add_argument("--seed", type=int, help="random seed (default: the preset's)")
    schedule.add_argument("--save-every", type=positive_int,
                          help="steps between resumable state files (default: the preset's)")
    schedule.add_argument("--no-bf16", action="store_true",
                          help="run in plain fp32, without bf16 autocast")
    schedule.add_argument("--no-compile", action="store_true",
                          help="run eagerly instead of compiled by torch.compile (Inductor; CUDA graphs on one GPU): "
                               "stage 2, and stage 1 where the preset compiles it (paper, official)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", type=user_path, help="MVTec-layout root holding <category>/train/good")
    data.add_argument("--category", type=category, help="category folder under --data (e.g. bottle); with "
                      "--train-dir: the category's name, for --rotation auto and the run's record")
    data.add_argument("--train-dir", type=user_path,
                      help="or: any folder of defect-free images (with --resume: the run's)")
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=("destseg", "pfadseg"), default="pfadseg",
                       help="pfadseg (AFF, PCAR and RCM on) or the destseg baseline "
                            "(default: %(default)s)")
    for mod in MODULES:
        model.add_argument(f"--{mod}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"turn {mod.upper()} on/off (default: per --model)")
    _add_run_args(data, model, p.add_argument_group("schedule"))
    p.add_argument("--out", type=user_path, required=True, help="run folder (checkpoint, logs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out on its images and settings")
    _add_device_arg(p)


def _add_device_arg(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP + note)


def _device(args: argparse.Namespace) -> torch.device:
    """The --device of a command, with the CPU's heap settings applied when it is the CPU."""
    device = resolve_device(args.device)
    cpu_heap_settings(device)
    return device


def _resume_settings(args: argparse.Namespace) -> None:
    """Fill a --resume command's model, schedule and data options from the run it
    continues (see trainer.resumed_settings). The options written on the command line
    must match the run, one given at its default value too; --model stands for its
    three modules, and --data --category for the images."""
    written = _written(args.argv)
    modules = {m: getattr(args, m) for m in MODULES}
    if "model" in written:
        named = ModelConfig.named(args.model)
        modules = {m: getattr(named, m) if on is None else on for m, on in modules.items()}
    given = {name: getattr(args, name) for name in RESUMED
             if name in written or (name == "train_dir" and "data" in written)}
    vars(args).update(resumed_settings(args.out, {**given, **modules}, defaults={}))


def _written(argv: list[str]) -> set[str]:
    """The train options written in a command line, whatever their values (compared
    with the defaults, an option given at its default looked left out)."""
    p = argparse.ArgumentParser(add_help=False)
    _add_train_args(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_known_args(argv)[0]))


def _check_train_paths(args: argparse.Namespace) -> None:
    """Every path `pfadseg train` reads or writes, checked before any image is
    decoded or a teacher is built, so a typo fails in a second, not minutes in.
    Under --resume, the options the run keeps are filled in from it first."""
    check_out_dir(args.out, args.resume)
    out_folder(args.out)
    if args.resume:
        _resume_settings(args)
        if args.train_dir is None:  # a run from before config.json recorded its images
            raise DataError(f"{args.out}/config.json does not say which images the run trained "
                            "on. Fix: add --train-dir DIR (or --data ROOT --category NAME).")
    train_image_paths(args.train_dir)
    weights = args.teacher_weights
    if args.resume and weights is not None:
        log.info("--teacher-weights is not needed with --resume: the run's teacher is in its "
                 "state file")
    check_run_paths(args.textures, args.texture_limit, None if args.resume else weights)


def check_run_paths(textures: Path | None, texture_limit: int | None, weights: Path | None) -> None:
    """--textures and --teacher-weights of `train` (and of each `benchmark` pair), checked
    before any work."""
    if textures is not None:
        texture_paths(textures, texture_limit)
    if weights is not None and str(weights) != RANDOM and not weights.is_file():
        raise TeacherWeightsError(f"--teacher-weights {weights}: file not found. Fix: give a local "
                                  "weights file (.pth or .safetensors), or leave the option out "
                                  "for the standard ImageNet weights.")


def cmd_train(args: argparse.Namespace) -> int:
    """`pfadseg train`: train on a folder of good images (or resume a run) and write its checkpoint."""
    device = _device(args)
    if args.data is not None and args.train_dir is not None:
        raise DataError("--data ROOT and --train-dir DIR both name the training images. Fix: give "
                        "one of them (--category NAME with --train-dir only sets its rotation)")
    if args.data is not None and args.train_dir is None and args.category:
        args.train_dir = mvtec_category(args.data, args.category) / "train" / "good"
    elif args.train_dir is None and not args.resume:
        raise DataError("give --data ROOT --category NAME, or --train-dir DIR")
    _check_train_paths(args)
    model_cfg = ModelConfig.named(args.model, aff=args.aff, pcar=args.pcar, rcm=args.rcm,
                                  teacher=args.teacher, image_size=args.image_size)
    schedule = {name: getattr(args, name) for name, where in RESUMED.items() if where == "train"}
    if args.no_bf16:
        schedule["bf16"] = False
    if args.no_compile:
        schedule.update(compile=False, compile_stage1=False)
    start = time.perf_counter()
    path = train_folder(model_cfg, args.preset, args.train_dir, args.out, schedule=schedule,
                        textures=args.textures, texture_limit=args.texture_limit,
                        rotation=args.rotation, category=args.category, skip_bad=args.skip_bad_images,
                        teacher_weights=args.teacher_weights, resume=args.resume, announce=True,
                        device=device)
    dist.teardown()
    print(f"checkpoint: {path}  ({time.perf_counter() - start:.0f} s)")
    _print_validation(args.out / VALIDATION_JSON)
    return 0


def _print_validation(path: Path) -> None:
    """One line of a finished run's validation figures (see pfadseg.validation)."""
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    final = report.get("final")
    if final:
        defects = report["defect_images"]  # this run's file: written just now
        print(f"validation on {report['images'] - defects} held-out good images and {defects} "
              "synthetic defects on them: "
              f"pixel AP {final['seg_pixel_ap']:.3f}, image AUROC {final['seg_image_auroc']:.3f} "
              f"(DeST map {final['dest_pixel_ap']:.3f}, student of step {report['student_step']}); "
              f"{len(report['warnings'])} warning(s); "
              f"per point: {path.with_suffix('.csv')}")


def _eval_size(text: str) -> int | None | str:
    """--eval-size: "input", "original" (None) or a number of pixels."""
    if text in ("input", "original"):
        return None if text == "original" else text
    try:
        return whole_number(1, MAX_EVAL_SIZE)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use input, original or a number of pixels up to {MAX_EVAL_SIZE}") from None


def cmd_test(args: argparse.Namespace) -> int:
    """`pfadseg test`: the paper's metrics on a labelled test set, with report.html."""
    from .evaluation import format_table, run_folder_test, run_test

    if args.test_dir is not None and (args.data is not None or args.category is not None):
        raise DataError("--test-dir is the whole test set: leave out --data and --category (they "
                        "name an MVTec-layout one)")
    if args.test_dir is None and (args.data is None or args.category is None):
        raise DataError("give --data ROOT --category NAME (MVTec layout), or --test-dir DIR")
    if args.mask_dir is not None and args.test_dir is None:
        raise DataError("--mask-dir goes with --test-dir (the MVTec layout has its ground_truth/)")
    if args.mask_dir is not None and not args.mask_dir.is_dir():
        raise DataError(f"--mask-dir {args.mask_dir}: not a folder. Fix: give the folder of masks "
                        "(by file stem, with or without _mask)")
    results_folder(args.out, args.overwrite)
    device = _device(args)
    # the layout, checked in a second before the checkpoint loads (seconds)
    list_test_images(args.test_dir or mvtec_category(args.data, args.category) / "test")
    model, meta = load_checkpoint(args.checkpoint)
    place(model, device)
    common = dict(batch_size=args.batch_size, bf16=not args.no_bf16, skip_bad=args.skip_bad_images,
                  eval_size=args.eval_size, compile=args.compile, report=not args.no_report)
    if args.test_dir is not None:
        result = run_folder_test(model, args.test_dir, args.out, meta, args.mask_dir, **common)
    else:
        result = run_test(model, args.data, args.category, args.out, meta, **common)
    print(format_table(result))
    print(f"metrics: {args.out / 'metrics.json'}"
          + ("" if args.no_report else f"  report: {args.out / 'report.html'}"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """`pfadseg predict`: scores, masks and overlays for new images."""
    from .detector import Detector
    from .predict import collect_inputs, predict_files

    backend = args.backend or ("onnx" if args.onnx is not None else "torch")
    if args.onnx is not None and backend != "onnx":
        raise DataError("--onnx is the model of --backend onnx. Fix: leave out --backend torch, or --onnx")
    if backend == "onnx" and device_name(args.device).split(":")[0] not in ("auto", "cpu"):
        raise DataError(f"--device {args.device}: the onnx backend runs on the CPU. Fix: leave "
                        "out --device, or use --backend torch")
    if backend == "onnx" and args.compile:
        raise DataError("--compile compiles the torch model; the onnx backend runs its export as "
                        "it is. Fix: leave out --compile, or use --backend torch")
    results_folder(args.out, args.overwrite)
    inputs = collect_inputs(args.inputs, skip=args.out)  # before the checkpoint loads (seconds)
    detector = Detector.load(args.checkpoint, device="cpu" if backend == "onnx" else _device(args),
                             threshold=args.threshold, bf16=not args.no_bf16, compile=args.compile,
                             backend=backend, onnx=args.onnx, batch_size=args.batch_size)
    rows = predict_files(detector, inputs, args.out, args.batch_size, skip_bad=args.skip_bad_images)
    flagged = sum(r.get("anomalous", False) for r in rows)
    skipped = sum("error" in r for r in rows)
    scored = len(rows) - skipped
    print(f"{scored} image{'s' * (scored != 1)} scored, {flagged} anomalous (threshold "
          f"{detector.thresholds.image:.4f})" + (f", {skipped} unreadable skipped" if skipped else "")
          + f"; results in {args.out} (summary.csv)")
    if rows and skipped == len(rows):  # a script must not read this as success
        raise DataError(f"no image could be read ({skipped} given); each file's error is in "
                        f"{args.out / 'summary.csv'}. Fix: give readable image files (e.g. PNG or JPEG)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`pfadseg calibrate`: new thresholds for a checkpoint, from good (and defect) images."""
    from .calibration import (CALIBRATED_SUFFIX, Thresholds, calibrate, check_calibrated_path,
                              write_calibrated_checkpoint)
    from .data import load_defect_set, load_image_folder

    if (args.defects is None) != (args.masks is None):
        raise DataError("--defects and --masks go together (defect images and their masks)")
    rates = {"false_alarm_rate": args.false_alarm_rate, "pixel_false_alarm_rate": args.pixel_false_alarm_rate}
    rates = {k: v for k, v in rates.items() if v is not None}
    if args.defects is not None and rates:
        raise DataError("--false-alarm-rate and --pixel-false-alarm-rate set the thresholds from "
                        "good images alone; with --defects both maximise F1 on the real defects. "
                        "Fix: leave out the rates, or --defects and --masks.")
    # a calibrated copy is recalibrated in place, not as <name>.calibrated.calibrated
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem.removesuffix(".calibrated")
                                                + CALIBRATED_SUFFIX)
    out_file(out, "checkpoint.calibrated.safetensors")
    check_calibrated_path(args.checkpoint, out)
    replaced = out.exists()
    device = _device(args)
    model, meta = load_checkpoint(args.checkpoint)
    place(model, device)
    size = model.config.image_size
    trained_on = meta.get("train_dir")
    if trained_on and Path(trained_on).is_relative_to(args.good.resolve()):
        log.warning("%s holds the images the model trained on (%s): it scores them lower than new "
                    "good images, so thresholds set on them flag good parts. Fix: --good with "
                    "good images it did not train on.", args.good, trained_on)
    good = load_image_folder(args.good, size, skip_bad=args.skip_bad_images)
    if len(good) < FEW_GOOD_IMAGES:
        log.warning("only %d good image(s) in %s: thresholds from so few are rough; %d or more "
                    "are better", len(good), args.good, FEW_GOOD_IMAGES)
    defects, masks, synthesizer = None, None, None
    if args.defects is not None:
        defects, masks = load_defect_set(args.defects, args.masks, size)
    else:
        textures = (load_textures(args.textures, size) if args.textures is not None
                    else procedural_textures(64, size))
        synthesizer = DefectSynthesizer(textures)
    thresholds = calibrate(model, good, synthesizer, args.seed, defect_images=defects,
                           defect_masks=masks, **rates, batch_size=args.batch_size, bf16=not args.no_bf16,
                           source=f"pfadseg calibrate on {args.good}")
    write_calibrated_checkpoint(args.checkpoint, out, thresholds)
    if meta.get("threshold") is not None:
        before = Thresholds.from_meta(meta)
        print(f"before: image {before.image:.6g}, pixel {before.pixel:.6g} ({before.method})")
    print(f"after:  image {thresholds.image:.6g}, pixel {thresholds.pixel:.6g} "
          f"({thresholds.method}; {thresholds.n_good} good, {thresholds.n_defects} "
          f"{'synthetic ' if synthesizer is not None else ''}defect images)")
    if thresholds.defect_recall is not None:
        print(f"{'synthetic' if synthesizer is not None else 'your'} defects: "
              f"{100 * thresholds.defect_recall:.0f}% flagged, pixel F1 {100 * thresholds.defect_pixel_f1:.1f}%")
    print(f"checkpoint: {out}" + (" (replaced the earlier calibration of this model)" if replaced else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`pfadseg export`: the checkpoint as an ONNX model."""
    from .export import export_onnx, onnx_metadata

    out = out_file(args.out or args.checkpoint.with_suffix(".onnx"), "checkpoint.onnx")
    if out.suffix != ".onnx":  # e.g. the checkpoint itself, or an image: nothing is overwritten
        raise DataError(f"--out {out}: not a .onnx file name (the model written there replaces "
                        f"any file of that name). Fix: --out {out.with_suffix('.onnx')}")
    _device(args)  # a wrong --device is still an error, as on the other commands
    model, meta = load_checkpoint(args.checkpoint)
    print(f"exporting to {out}, then checking it with onnxruntime (a few minutes on a CPU)...", flush=True)
    props = onnx_metadata(model, meta)  # once: it hashes the weights
    export_onnx(model, out, props)
    size = model.config.image_size
    print(f"exported: {out}\n  input 'images': float32 (B, 3, {size}, {size}), RGB in [0, 1], each "
          f"image resized to {size}x{size}; outputs 'seg_map', 'dest_map', 'score'")
    print(f"  thresholds: image {props['image_threshold']}, pixel {props['pixel_threshold']} "
          f"({props['threshold_method']})" if "image_threshold" in props else
          "  no thresholds in the checkpoint: set your own on 'score' and 'seg_map'")
    print("  all of this, in full, is in the file's metadata_props")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`pfadseg report`: the paper-layout tables of test results."""
    from .report import write_report

    paths = write_report(args.results, out_folder(args.out), labels=args.label)
    print(paths[0].read_text())
    print(f"tables: {' '.join(map(str, paths))}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    """`pfadseg benchmark`: train and test every (category, variant) pair, then report."""
    from .benchmark import run_benchmark

    return run_benchmark(args)


def _add_benchmark_args(p: argparse.ArgumentParser) -> None:
    """`pfadseg benchmark`: what to run, where, and train's model and schedule options."""
    p.add_argument("--data", type=user_path, required=True,
                   help="MVTec AD root holding <category>/train/good and <category>/test")
    p.add_argument("--categories", default="all",
                   help="all (the MVTec AD categories found under --data; the missing ones are "
                        "listed) or a comma list, e.g. bottle,carpet (default: %(default)s)")
    p.add_argument("--variants", default="pfadseg,destseg",
                   help="ablation (the 8 combinations of AFF, PCAR and RCM: Table 4) or a comma "
                        "list of pfadseg, destseg, destseg+<modules> such as destseg+aff+rcm "
                        "(default: %(default)s)")
    p.add_argument("--out", type=user_path, required=True,
                   help="benchmark folder: <category>/<variant>/ per pair, report/ for the "
                        "tables; rerunning continues it (finished pairs are skipped)")
    p.add_argument("--devices", type=positive_int, metavar="N",
                   help="how many GPUs to use (the first N), one job on each at a time "
                        "(default: all visible CUDA devices; without a GPU, one job at a time)")
    _add_device_arg(p)
    passed = p.add_argument_group("model and schedule (passed to every `pfadseg train`)")
    _add_run_args(passed, passed, passed)
    for action in passed._group_actions:  # left out, train's own default: not handed on
        if action.dest in ("image_size", "rotation"):
            action.help = action.help.replace("%(default)s", str(action.default))
            action.default = None


def cmd_demo(args: argparse.Namespace) -> int:
    """`pfadseg demo`: train and test on the bundled sample."""
    from .demo import run_demo

    out_folder(args.out)
    run_demo(args.out, quick=args.quick, device=_device(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """`pfadseg serve`: the web page and HTTP API around a checkpoint."""
    from .detector import Detector
    from .serve import bind, serve

    listener = bind(args.host, args.port, args.token)  # before the minute a model can take to load
    with listener:
        detector = Detector.load(args.checkpoint, device=_device(args), threshold=args.threshold,
                                 bf16=not args.no_bf16)
        serve(detector, args.host, args.port, args.token, args.max_upload_mb, args.max_megapixels,
              listener)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `pfadseg` command line: global options and one subcommand per task."""
    parser = argparse.ArgumentParser(prog="pfadseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pfadseg {__version__}")
    common = argparse.ArgumentParser(add_help=False)  # before or after the command's name
    for p, unset in ((parser, {}), (common, {"default": argparse.SUPPRESS})):  # the main parser's defaults
        p.add_argument("--threads", type=whole_number(1, os.cpu_count() or 1, "this machine's CPUs"),
                       **unset, help="CPU threads for torch and ONNX Runtime, at most the CPUs (default: all cores)")
        p.add_argument("-v", "--verbose", action="store_true", **unset, help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    command = functools.partial(sub.add_parser, parents=[common])

    p = command("train", help="train on a folder of defect-free images")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = command("test", help="evaluate a checkpoint on a labelled test set (MVTec "
                "layout or any folder of good/ and defect-type folders)")
    p.add_argument("--checkpoint", type=user_path, required=True,
                   help="checkpoint.safetensors of a `pfadseg train` run")
    p.add_argument("--data", type=user_path, help="MVTec-layout root holding <category>/test and "
                   "<category>/ground_truth")
    p.add_argument("--category", type=category, help="category folder under --data (e.g. bottle)")
    p.add_argument("--test-dir", type=user_path,
                   help="or: any folder holding good/ and one folder per defect type (searched "
                        f"recursively; {'/'.join(IMAGE_SUFFIXES)})")
    p.add_argument("--mask-dir", type=user_path,
                   help="with --test-dir: ground-truth masks, searched recursively and matched "
                        "by file stem with or without _mask; without it, image metrics only")
    p.add_argument("--out", type=user_path, required=True,
                   help="folder for metrics.json, metrics.md and report.html")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per inference batch (default: %(default)s)")
    p.add_argument("--eval-size", default="input", type=_eval_size,
                   help="pixel metrics at the model's input size ('input', the official 256x256 "
                        "protocol), at N x N, or 'original' (each image's own resolution) "
                        "(default: %(default)s)")
    p.add_argument("--no-bf16", action="store_true", help="run inference in plain fp32")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    _add_device_arg(p)
    p.set_defaults(func=cmd_test)

    p = command("predict", help="score images and paint their defects")
    p.add_argument("inputs", nargs="+", type=user_path, help="image files or folders")
    p.add_argument("--checkpoint", type=user_path, required=True,
                   help="checkpoint.safetensors of a `pfadseg train` run")
    p.add_argument("--out", type=user_path, required=True,
                   help="folder for overlays and masks (at the image's size, at most 1024 px a "
                        "side), raw maps (.npy, at the model's input size), summary.csv/.json "
                        "and report.html")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--threshold", type=probability,
                   help="image-score threshold between 0 and 1 (scores are probabilities; "
                        "default: the checkpoint's calibrated one)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images per inference batch (default: %(default)s)")
    p.add_argument("--backend", choices=("torch", "onnx"),
                   help="run the checkpoint in PyTorch, or its ONNX export in onnxruntime "
                        "(default: torch; onnx when --onnx is given)")
    p.add_argument("--onnx", type=user_path, help="exported model for the onnx backend (default: "
                   "the checkpoint's path with .onnx)")
    p.add_argument("--no-bf16", action="store_true", help="run inference in plain fp32")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (torch backend)")
    p.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    _add_device_arg(p, "; the torch backend's (onnx runs on the CPU)")
    p.set_defaults(func=cmd_predict)

    p = command("calibrate", help="set a checkpoint's image and pixel thresholds from "
                "your own images; writes a new checkpoint")
    p.add_argument("--checkpoint", type=user_path, required=True, help="checkpoint to calibrate "
                   "(left unchanged)")
    p.add_argument("--good", type=user_path, required=True,
                   help="folder of defect-free images the model did not train on (recursive)")
    p.add_argument("--defects", type=user_path,
                   help="folder of real defect images (recursive), given with --masks: both "
                        "thresholds then maximise F1 on them")
    p.add_argument("--masks", type=user_path, help="masks of the --defects images, matched by file "
                   "stem with or without _mask (recursive)")
    p.add_argument("--out", type=user_path, help="new checkpoint (default: <name>.calibrated"
                   ".safetensors beside it, e.g. checkpoint.calibrated.safetensors; a calibrated "
                   "copy is itself replaced)")
    p.add_argument("--false-alarm-rate", type=probability,
                   help="without --defects: the fraction of good images the image threshold "
                        f"may flag (default: {DEFAULT_FALSE_ALARM_RATE})")
    p.add_argument("--pixel-false-alarm-rate", type=probability,
                   help="without --defects: the fraction of good pixels the pixel threshold "
                        f"may put in the mask (default: {DEFAULT_PIXEL_FALSE_ALARM_RATE})")
    p.add_argument("--textures", type=user_path, help="without --defects: texture images for the "
                   "synthetic defects that check the thresholds (default: built-in "
                   "procedural textures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic defects "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images per inference batch (default: %(default)s)")
    p.add_argument("--no-bf16", action="store_true", help="run inference in plain fp32")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="log and skip unreadable good images")
    _add_device_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = command("export", help="export a checkpoint to ONNX")
    p.add_argument("--checkpoint", type=user_path, required=True,
                   help="checkpoint.safetensors of a `pfadseg train` run")
    p.add_argument("--out", type=user_path,
                   help="ONNX file to write (default: the checkpoint's path with .onnx)")
    _add_device_arg(p, "; checked only: the export traces an fp32 copy on the CPU, and the "
                       "file runs on any device")
    p.set_defaults(func=cmd_export)

    p = command("report", help="merge metrics.json files into the paper's tables")
    p.add_argument("results", nargs="+", type=user_path, help="metrics.json files of `pfadseg test`")
    p.add_argument("--out", type=user_path, required=True,
                   help="folder for results.md, results.csv and (several variants or runs) variants.csv")
    p.add_argument("--label", action="append",
                   help="run label of each file, in order (repeat it: --label a --label b), to "
                        "compare runs of the same category and variant; default: the parts "
                        "of their paths that differ")
    p.set_defaults(func=cmd_report)

    p = command("benchmark", help="train and test every (category, variant) pair, "
                                  "then write the paper's tables")
    _add_benchmark_args(p)
    p.set_defaults(func=cmd_benchmark)

    p = command("demo", help="train and evaluate on the bundled bottle sample, offline")
    p.add_argument("--out", type=user_path, default=Path("pfadseg-demo"),
                   help="folder for the run, test metrics and predictions (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    _add_device_arg(p)
    p.set_defaults(func=cmd_demo)

    p = command("serve", help="a web page and JSON API that score uploaded images")
    p.add_argument("--checkpoint", type=user_path, required=True, help="trained model to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only); any other "
                        "needs --token")
    p.add_argument("--port", type=port, default=8000,
                   help="port; 0 takes any free one, printed (default: %(default)s)")
    p.add_argument("--token", help="secret that /predict and /model calls must send (Authorization: "
                                   "Bearer T, or ?token=T; the page, /health and /docs stay open); "
                                   "required for a non-local --host")
    p.add_argument("--threshold", type=probability,
                   help="image-score threshold between 0 and 1 (scores are probabilities; "
                        "default: the checkpoint's calibrated one)")
    p.add_argument("--max-upload-mb", type=positive_number, default=20.0,
                   help="largest accepted image file in MB (default: %(default)s)")
    p.add_argument("--max-megapixels", type=positive_number, default=40.0,
                   help="largest accepted image in megapixels, a decompression-bomb guard; the "
                        "server holds at most 4x this in decoded images at a time (beyond: 503, "
                        "retry) (default: %(default)s)")
    p.add_argument("--no-bf16", action="store_true", help="run in plain fp32")
    _add_device_arg(p)
    p.set_defaults(func=cmd_serve)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is but with its own exit status (143, the shell's)."""


def main(argv: list[str] | None = None) -> int:
    """Run one `pfadseg` command; its exit status (a clear message, not a traceback, for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # which options were written (see _written)
    args.started = time.time()  # files written since are this command's
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if dist.rank() > 0:  # torchrun's other ranks would repeat rank 0's output: errors only
        logging.getLogger().setLevel(logging.ERROR)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    if args.threads:
        torch.set_num_threads(args.threads)
    # `kill`, `timeout` and `docker stop` get what Ctrl-C gets: partial results written, no stray files
    terminate = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    out = getattr(args, "out", None)
    # the folders a failed command would leave behind empty: --out and its missing parents
    # (resolved first: in new/../old/x, the existing old/ would pass for one the command made)
    real = Path(os.path.realpath(out)) if isinstance(out, Path) else None
    created = ([real, *(p for p in real.parents if not p.exists())]
               if real is not None and not real.exists() and dist.rank() == 0 else [])
    try:
        return args.func(args)
    except (DataError, CheckpointError, TeacherWeightsError, TrainingError, ValueError,
            ImportError, OSError) as exc:  # ImportError: an optional extra (onnx, serve) is missing
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            exc = f"{exc}. Fix: free space on that disk (finished files are kept) and rerun{_again(args)}"
        # tqdm.write clears a progress bar the error left open, so the message gets its own line
        tqdm.write(f"pfadseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if dist.rank() == 0:  # under torchrun every rank is interrupted: one line says it
            tqdm.write(f"pfadseg {args.command}: interrupted{_again(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)
        for folder in created:  # deepest first; rmdir keeps a folder that holds anything
            with contextlib.suppress(OSError):
                folder.rmdir()


def _main_thread() -> bool:
    """Whether signal handlers can be set (Python allows it only in the main thread)."""
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated


def _again(args: argparse.Namespace) -> str:
    """How to go on with a command that stopped half-way, where it can go on."""
    if args.command == "benchmark":
        return "; rerun the same command to continue"
    if args.command == "train" and (args.out / STATE_NAME).is_file():
        with contextlib.suppress(CheckpointError, OSError, KeyError):  # the step is a courtesy
            step = read_meta(args.out / STATE_NAME, kind=STATE_FORMAT)["step"]
            return f"; continue with --resume, from step {step} (the last saved)"
        return "; continue with --resume"
    summary = args.out / "summary.csv" if args.command == "predict" else None
    if summary is not None and summary.is_file() and summary.stat().st_mtime >= args.started:
        return f"; the images scored before it are in {summary} (a rerun needs --overwrite)"
    return ""


if __name__ == "__main__":  # `python -m pfadseg.cli`, as `python -m pfadseg`
    sys.exit(main())
