"""The `pfadseg` command: train, test, predict, export, report and demo."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import CheckpointError, load_checkpoint
from .config import PRESETS, preset
from .data import DataError, load_textures, load_train_images, mvtec_category
from .memory import keep_large_tensors_in_heap
from .models import TEACHERS, ModelConfig, TeacherWeightsError
from .synthesis import DefectSynthesizer, procedural_textures, rotation_policy_for
from .trainer import TrainData, TrainingError, train

log = logging.getLogger("pfadseg")
ROTATIONS = ("auto", "none", "small", "right_angle")
COMPILE_HELP = ("compile the model with torch.compile (Inductor, needs a C++ compiler): "
                "about 2.5x faster after one to two minutes of compiling; pays off for "
                "hundreds of images")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("data")
    src.add_argument("--data", type=Path, help="MVTec-layout root holding <category>/train/good")
    src.add_argument("--category", help="category folder under --data (e.g. bottle)")
    src.add_argument("--train-dir", type=Path, help="or: any folder of defect-free images")
    src.add_argument("--textures", type=Path,
                     help="folder of texture images for synthetic defects (DTD images/); "
                          "default: built-in procedural textures")
    src.add_argument("--texture-limit", type=int, help="use at most this many texture images")
    src.add_argument("--rotation", choices=ROTATIONS, default="auto",
                     help="rotation augmentation of the good images; auto = the official "
                          "per-category choice (none for custom data)")
    src.add_argument("--skip-bad-images", action="store_true", help="log and skip unreadable images")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("destseg", "pfadseg"), default="pfadseg")
    for mod in ("aff", "pcar", "rcm"):
        m.add_argument(f"--{mod}", action=argparse.BooleanOptionalAction, default=None,
                       help=f"turn {mod.upper()} on/off (default: per --model)")
    m.add_argument("--teacher", choices=sorted(TEACHERS), default="resnet18")
    m.add_argument("--teacher-weights", help="local teacher weights file (no download needed)")
    m.add_argument("--image-size", type=int, default=256)
    t = p.add_argument_group("schedule")
    t.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--stage1-steps", type=int)
    t.add_argument("--stage2-steps", type=int)
    t.add_argument("--lr-student", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-every", type=int, help="steps between resumable state files")
    t.add_argument("--no-bf16", action="store_true", help="train in plain fp32")
    t.add_argument("--no-compile", action="store_true",
                   help="run eagerly instead of compiled by torch.compile (Inductor): stage 2, "
                        "and stage 1 where the preset compiles it (paper, official)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, logs)")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")


def cmd_train(args: argparse.Namespace) -> int:
    keep_large_tensors_in_heap()
    if args.train_dir is not None:
        train_dir, category = args.train_dir, args.category or args.train_dir.name
    elif args.data is not None and args.category:
        train_dir, category = mvtec_category(args.data, args.category) / "train" / "good", args.category
    else:
        raise DataError("give --data ROOT --category NAME, or --train-dir DIR")
    model_cfg = ModelConfig.named(args.model, aff=args.aff, pcar=args.pcar, rcm=args.rcm,
                                  teacher=args.teacher, image_size=args.image_size)
    train_cfg = preset(args.preset, batch_size=args.batch_size, stage1_steps=args.stage1_steps,
                       stage2_steps=args.stage2_steps, lr_student=args.lr_student, seed=args.seed,
                       save_every=args.save_every, bf16=False if args.no_bf16 else None,
                       compile=False if args.no_compile else None,
                       compile_stage1=False if args.no_compile else None)
    images = load_train_images(train_dir, args.image_size, skip_bad=args.skip_bad_images)
    if args.textures is not None:
        textures = load_textures(args.textures, args.image_size, args.texture_limit)
    else:
        log.warning("no --textures given: using built-in procedural textures "
                    "(DTD textures give the paper's results)")
        textures = procedural_textures(args.texture_limit or 64, args.image_size)
    rotation = rotation_policy_for(category) if args.rotation == "auto" else args.rotation
    print(f"training {model_cfg.variant} ({model_cfg.teacher} teacher) on {len(images)} images "
          f"from {train_dir}, preset {args.preset}, rotation {rotation}", file=sys.stderr)
    start = time.perf_counter()
    path = train(model_cfg, train_cfg, TrainData(images, DefectSynthesizer(textures), rotation),
                 args.out, teacher_weights=args.teacher_weights, resume=args.resume,
                 extra_meta={"category": category, "train_dir": str(train_dir),
                             "preset": args.preset, "rotation": rotation})
    print(f"checkpoint: {path}  ({time.perf_counter() - start:.0f} s)")
    return 0


def _eval_size(text: str) -> int | None | str:
    """--eval-size: "input", "original" (None) or a number of pixels."""
    if text in ("input", "original"):
        return None if text == "original" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("use input, original or a number") from None


def cmd_test(args: argparse.Namespace) -> int:
    from .evaluation import format_table, run_test

    keep_large_tensors_in_heap()
    model, meta = load_checkpoint(args.checkpoint)
    result = run_test(model, args.data, args.category, args.out, meta, args.batch_size,
                      bf16=not args.no_bf16, skip_bad=args.skip_bad_images,
                      eval_size=args.eval_size, compile=args.compile)
    print(format_table(result))
    print(f"metrics: {args.out / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import collect_inputs, predict_images

    keep_large_tensors_in_heap()
    model, meta = load_checkpoint(args.checkpoint)
    threshold = args.threshold if args.threshold is not None else meta.get("threshold")
    if threshold is None:
        raise CheckpointError(f"{args.checkpoint} stores no threshold: pass --threshold")
    if args.backend == "onnx":
        from .export import onnx_map_fn
        map_fn = onnx_map_fn(args.onnx or args.checkpoint.with_suffix(".onnx"))
    else:
        from .inference import torch_map_fn
        map_fn = torch_map_fn(model, bf16=not args.no_bf16, compile=args.compile,
                              batch_size=args.batch_size)
    rows = predict_images(collect_inputs(args.inputs), map_fn, model.config.image_size, threshold,
                          args.out, args.batch_size, skip_bad=args.skip_bad_images)
    flagged = sum(r.get("anomalous", False) for r in rows)
    print(f"{len(rows)} images, {flagged} anomalous (threshold {threshold:.4f}); "
          f"results in {args.out} (summary.csv)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model, _ = load_checkpoint(args.checkpoint)
    out = args.out or args.checkpoint.with_suffix(".onnx")
    export_onnx(model, out)
    print(f"exported: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    md_path, csv_path = write_report(args.results, args.out)
    print(md_path.read_text())
    print(f"tables: {md_path} {csv_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfadseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pfadseg {__version__}")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train on a folder of defect-free images")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("test", help="evaluate a checkpoint on an MVTec-layout test set")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-size", default="input", type=_eval_size,
                   help="pixel metrics at the model's input size (default, the official 256x256 "
                        "protocol), at N x N, or 'original' (each image's own resolution)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--skip-bad-images", action="store_true")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score images and paint their defects")
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threshold", type=float, help="default: the checkpoint's calibrated one")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    p.add_argument("--onnx", type=Path, help="exported model (default: checkpoint with .onnx)")
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP + " (torch backend)")
    p.add_argument("--skip-bad-images", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="merge metrics.json files into the paper's tables")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="train and evaluate on the bundled bottle sample, offline")
    p.add_argument("--out", type=Path, default=Path("pfadseg-demo"))
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (DataError, CheckpointError, TeacherWeightsError, TrainingError, ValueError) as exc:
        print(f"pfadseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pfadseg {args.command}: interrupted; a training run continues with --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
