"""Two-stage training (DeSTSeg / PFADSeg) with resumable, atomic state files.

Stage 1 trains the denoising student (cosine loss against the frozen teacher);
stage 2 freezes it and trains the segmentation net (focal + L1 loss) on the
synthetic masks. No step does work that no loss uses: stage 1 runs no
segmentation forward, stage 2 runs teacher and student without autograd.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None
if TYPE_CHECKING:
    import _csv  # the type of csv.writer(...) objects

from . import checkpoint as ckpt
from . import distributed as dist
from .calibration import Thresholds, calibrate, held_out_count, held_out_split
from .config import TrainConfig, preset
from .inference import to_input
from .models import AnomalyModel, ModelConfig
from .models.teacher import RANDOM
from .models.losses import segmentation_loss
from .runtime import (autocast, bf16_supported, compiled, cpu_training_fixes, fused_sgd, place,
                      release_free_memory, resolve_device, step_begin)
from .data import DataError, category_name, category_of, load_textures, load_train_images
from .files import replacing, write_text
from .synthesis import (ROTATION_POLICIES, DefectSynthesizer, procedural_textures, rotate_images,
                        rotation_policy_for)
from .variants import MODULES, variant_name
from .validation import FIGURES, StudentPick, ValidationSet, assess, student_check_steps, validation_steps

log = logging.getLogger(__name__)
STATE_FORMAT = ckpt.STATE_FORMAT
CHECKPOINT_NAME = ckpt.CHECKPOINT_NAME
STATE_NAME = "train_state.safetensors"
VALIDATION_CSV, VALIDATION_JSON = "validation.csv", "validation.json"
LOSS_FIELDS = ["step", "stage", "loss", "cosine", "focal", "l1", "seconds"]  # losses.csv
VALIDATION_FIELDS = ["step", "stage", *FIGURES, "seconds"]
ROTATIONS = ("auto", *ROTATION_POLICIES)  # auto: the official policy by category


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, mismatched resume state)."""


@dataclass
class TrainData:
    """What a run trains on: images in memory, the defect synthesiser, the rotation policy."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    synthesizer: DefectSynthesizer
    rotation: str = "none"
    names: tuple[str, ...] = ()  # file names of the folder's images, for --resume's check

    @classmethod
    def from_folder(cls, train_dir: Path, size: int, textures: Path | None = None,
                    texture_limit: int | None = None, rotation: str = "auto", category: str | None = None,
                    skip_bad: bool = False, progress: bool = True) -> "TrainData":
        """The good images of a folder at size x size, with defects from the texture
        folder (built-in procedural textures without one) and the rotation policy
        (`auto`: the official choice for an MVTec `category`, else none); `progress`
        shows the loading bars."""
        if rotation not in ROTATIONS:
            raise ValueError(f"unknown rotation {rotation!r}; choose from {ROTATIONS}")
        images, names = load_train_images(Path(train_dir), size, skip_bad, progress)
        if textures is not None:
            texture_images = load_textures(Path(textures), size, texture_limit, progress)
        else:
            log.warning("no textures given: using built-in procedural textures "
                        "(DTD textures give the paper's results)")
            texture_images = procedural_textures(texture_limit or 64, size)
        if rotation == "auto":
            rotation = rotation_policy_for(category or Path(train_dir).name)
        return cls(images, DefectSynthesizer(texture_images), rotation, tuple(names))


def check_aff_batch(aff: bool, per_process: int, config: TrainConfig,
                    without: str = "AFF off (--no-aff)") -> None:
    """AFF's batch norm on pooled features (one value per channel and image) cannot
    train on one image, and on two its gradients explode unless clipped (measured,
    demo preset cut to 120 + 80 steps: BN scales of 5e7 and validation pixel AP 0.16
    at batch 2, against 0.71 / 0.77 / 0.79 at batch 3 / 4 / 8)."""
    least = 2 if config.grad_clip is not None else 3
    if not aff or per_process >= least:
        return
    share = f"{per_process} image{'s' if per_process > 1 else ''} per process"
    why = ("needs two or more" if least == 2 else
           "makes the gradients of two explode (the model comes out garbage)")
    raise ValueError(f"batch size {config.batch_size} leaves {share}, and AFF's batch norm on "
                     f"pooled features {why}. Fix: a batch size of {least * dist.processes()} "
                     f"or more (--batch-size), or {without}")


class Trainer:
    """Runs the schedule of a TrainConfig on one device (or one rank of several),
    writing state and a loss log to out_dir."""

    def __init__(self, model: AnomalyModel, config: TrainConfig, data: TrainData, out_dir: Path,
                 device: torch.device = torch.device("cpu"), held_out: torch.Tensor | None = None) -> None:
        self.model, self.config, self.device = model, config, device
        self.out_dir = Path(out_dir)
        self.use_bf16 = config.bf16 and bf16_supported(device)
        place(model, device)
        cpu_training_fixes(model, device, self.use_bf16)
        # decoded once; on a GPU the images and textures live there and defects are drawn there
        self.images = data.images.to(device)
        self.synthesizer = DefectSynthesizer(data.synthesizer.textures.to(device))
        self.rotation = data.rotation
        self.batch_size = dist.split_batch(config.batch_size)
        check_aff_batch(model.config.aff, self.batch_size, config)
        # each rank draws its own batches and defects (CPU generator: same draws on any device)
        self.generator = torch.Generator().manual_seed(config.seed + 1_000_003 * dist.rank())
        self.student = dist.wrap(model.student, device)
        self.segmentation = dist.wrap(model.segmentation, device)
        self.step = 0
        self.saved_step: int | None = None  # step of the state file this run last wrote
        self._teacher_cache: list[torch.Tensor] = []  # T1..T3 of every clean image
        self._stage1: Callable | None = None
        self._stage2: tuple[Callable, Callable] | None = None
        seg = model.segmentation
        sgd = dict(momentum=config.momentum, weight_decay=config.weight_decay,
                   fused=fused_sgd(device))
        self.opt_student = torch.optim.SGD(model.student.parameters(), lr=config.lr_student, **sgd)
        self.opt_seg = torch.optim.SGD(
            [{"params": seg.res.parameters(), "lr": config.lr_seg_res},
             {"params": seg.head.parameters(), "lr": config.lr_seg_head}], lr=config.lr_seg_res, **sgd)
        # synthetic defects on held-out good images, scored at `validation_steps` (rank 0)
        self.validation_set = (ValidationSet.build(held_out, data.synthesizer, config.seed)
                               if held_out is not None and len(held_out) and dist.is_main() else None)
        self.validation: list[dict[str, float]] = []  # the rows of validation.csv
        # the stage-1 points whose best student goes on to stage 2 (none: the last one does)
        checks = student_check_steps(config) if self.validation_set is not None else []
        self.student_checks = set(checks) if len(checks) > 1 else set()
        self.pick = StudentPick()

    # --- one step ----------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices, clean images, synthetic images and masks of one random batch."""
        idx = torch.randint(len(self.images), (self.batch_size,), generator=self.generator)
        clean = to_input(self.images[idx.to(self.device)])
        clean = rotate_images(clean, self.rotation, self.generator)
        augmented, mask = self.synthesizer(clean, self.generator)
        return idx, clean, augmented, mask

    def _clean_targets(self, idx: torch.Tensor) -> list[torch.Tensor] | None:
        """Teacher features of the clean images when nothing random touches them
        (no rotation): computed once for all images, in fixed chunks so a resumed
        run gets the same values, then looked up. None when they must be recomputed."""
        if self.rotation != "none":
            return None
        if not self._teacher_cache:
            chunks = [self.model.teacher_features(to_input(self.images[i:i + 16]))
                      for i in range(0, len(self.images), 16)]
            self._teacher_cache = [torch.cat(level) for level in zip(*chunks)]
        return [level[idx.to(self.device)] for level in self._teacher_cache]

    def _student_loss(self, clean: torch.Tensor, augmented: torch.Tensor,
                      targets: list[torch.Tensor] | None) -> torch.Tensor:
        """Stage 1 (Eq. 4) through the trainer's student (wrapped for DDP when distributed)."""
        return self.model.student_loss(clean, augmented, targets, self.student)

    def _stage1_loss(self) -> Callable:
        """Stage 1's loss, compiled where the preset says so (`compile_stage1`)."""
        if self._stage1 is None:
            fn = self._student_loss
            self._stage1 = compiled(fn, self.device) if self.config.compile_stage1 else fn
        return self._stage1

    def _drop_stage1_state(self) -> None:
        """Free what only stage 1 uses: the student's gradients and momentum, the
        clean-image teacher features and its loss function (stage 2's state files
        then hold no student momentum; nothing steps the student again)."""
        dist.sync_state(self.model.student)  # stage 2 runs rank 0's frozen student on every rank
        self.opt_student.zero_grad(set_to_none=True)
        self.opt_student.state.clear()
        self._teacher_cache = []
        self._stage1 = None
        release_free_memory(self.device)

    def _stage2_forward(self) -> tuple[Callable, Callable]:
        """Stage 2's two halves: the frozen teacher+student features (compiled with
        the weights as constants) and the segmentation net. Set up once, when
        stage 2 starts, after dropping stage 1's state."""
        if self._stage2 is None:
            self._drop_stage1_state()
            features, segment = self.model.segmentation_input, self.segmentation
            if self.config.compile:
                features = compiled(features, self.device, frozen=True)
                segment = compiled(segment, self.device)
            self._stage2 = (features, segment)
        return self._stage2

    def _compiles_next(self) -> bool:
        """Whether the next step compiles its stage's model first."""
        if self.step < self.config.stage1_steps:
            return self.config.compile_stage1 and self._stage1 is None
        return self.config.compile and self._stage2 is None

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the current stage; returns its losses."""
        stage = 1 if self.step < self.config.stage1_steps else 2
        step_begin(self.device)
        idx, clean, augmented, mask = self._batch()
        if stage == 1:
            self.model.student.train()
            with autocast(self.device, self.use_bf16):
                # Eq. 4 sums over the batch and DDP averages the ranks' gradients: times
                # the rank count, the gradient is the whole batch's, as on one process
                loss = self._stage1_loss()(clean, augmented, self._clean_targets(idx)) * dist.world_size()
            parts = {"cosine": loss}
            optimizer = self.opt_student
        else:
            self.model.student.eval()
            self.model.segmentation.train()
            features, segment = self._stage2_forward()
            with autocast(self.device, self.use_bf16):
                with torch.no_grad():
                    feats = features(augmented)
                logits = segment(feats)
            focal, l1 = segmentation_loss(logits, mask, self.config.focal_gamma)  # Eqs. 10-11
            loss = focal + l1  # Eq. 12: its weights are not in the paper; 1:1 as the official code
            parts = {"focal": focal, "l1": l1}
            optimizer = self.opt_seg
        factor = self.config.lr_factor(self.step)
        for group, base in zip(optimizer.param_groups, self._base_lrs(optimizer)):
            group["lr"] = base * factor
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"non-finite loss ({value}) at step {self.step + 1} (stage {stage}); "
                f"stopped. {self._last_good()} Fix: check the input images, or lower the "
                "learning rate (--lr-student) and start again with another --out "
                "(--resume keeps the saved settings)." + self._bf16_hint())
        optimizer.step()
        self.step += 1
        return {"stage": stage, "loss": value, **{k: v.item() for k, v in parts.items()}}

    def _base_lrs(self, optimizer: torch.optim.Optimizer) -> list[float]:
        """The configured learning rate of each of the optimiser's parameter groups."""
        cfg = self.config
        return [cfg.lr_student] if optimizer is self.opt_student else [cfg.lr_seg_res, cfg.lr_seg_head]

    def validate(self, writer: _csv._writer) -> None:
        """Score the validation set now (rank 0), append a row to validation.csv; others wait."""
        if self.validation_set is not None:
            start = time.perf_counter()
            figures = self.validation_set.score(self.model, self.use_bf16)
            row = {"step": self.step, "stage": 1 if self.step <= self.config.stage1_steps else 2,
                   **figures, "seconds": round(time.perf_counter() - start, 1)}
            self.validation.append(row)
            writer.writerow([row["step"], row["stage"], *(f"{row[f]:.4f}" for f in FIGURES),
                             row["seconds"]])
            if self.step in self.student_checks:
                self._pick_student(figures["dest_pixel_ap"])
        dist.barrier()

    def _pick_student(self, score: float) -> None:
        """Offer the student just validated; when stage 1 ends, put back the best one."""
        student = self.model.student
        self.pick.offer(self.step, score, student)
        if self.step == self.config.stage1_steps and self.pick.step not in (None, self.step):
            self.pick.restore(student)
            log.info("stage 2 reads the student of step %d (DeST pixel AP %.3f on the validation "
                     "set), not the last one (%.3f)", self.pick.step, self.pick.score, score)

    # --- state -------------------------------------------------------------------
    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"student": self.opt_student, "seg": self.opt_seg}

    def _bf16_hint(self) -> str:
        """The remedy for a CPU kernel that gets bf16 wrong (see runtime.cpu_training_fixes)."""
        if not self.use_bf16:
            return ""
        return (" If it fails within the first steps, also try --no-bf16: a CPU kernel that "
                "computes bf16 wrongly shows up this way.")

    def _last_good(self) -> str:
        """Where the last good state is, for error messages."""
        if self.saved_step is None:
            return "No state file was written."
        return f"The last good state (step {self.saved_step}) is kept in {self.out_dir / STATE_NAME}."

    def save_state(self) -> None:
        """Everything needed to continue bit-exactly, written atomically.

        Weights that are no longer finite are never saved: the run stops and the
        previous state file stays as it was.
        """
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"non-finite weights after step {self.step} ({bad[0]}); not "
                                f"saved. {self._last_good()} Fix: lower the learning rate "
                                "(--lr-student) and start again with another --out.")
        rngs = dist.gather(self.generator.get_state())  # every rank draws its own batches
        if dist.is_main():
            tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
            for name, opt in self._optimizers().items():
                for idx, st in opt.state_dict()["state"].items():
                    for key, value in st.items():
                        if torch.is_tensor(value):
                            tensors[f"opt.{name}.{idx}.{key}"] = value.detach().cpu()
            tensors.update({_rng_key(r): state for r, state in enumerate(rngs)})
            if self.step < self.config.stage1_steps:  # the best student so far, to put back later
                tensors.update({f"pick.{k}": v for k, v in self.pick.weights.items()})
            meta = {"format": STATE_FORMAT, "format_version": ckpt.FORMAT_VERSION, "step": self.step,
                    "world_size": dist.world_size(), "model": self.model.config.to_dict(),
                    "train": self.config.to_dict(),
                    "student_pick": ({"step": self.pick.step, "score": self.pick.score}
                                     if self.pick.step is not None else None)}
            ckpt.atomic_save(tensors, meta, self.out_dir / STATE_NAME)
        dist.barrier()
        self.saved_step = self.step

    def load_state(self, path: Path) -> None:
        """Continue from a state file written by `save_state` for the same run."""
        tensors, meta = ckpt.read(path, kind=STATE_FORMAT)
        mine = json.loads(json.dumps(self.model.config.to_dict()))
        if meta["model"] != mine:
            raise TrainingError(f"{path}: state of another model ({meta['model']}), not {mine}. "
                                "Fix: resume with the model the run started with (its config.json), "
                                "or start a new run with another --out.")
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(ckpt.model_tensors(self.model, weights))
        for name, opt in self._optimizers().items():
            sd = opt.state_dict()
            params = [p for group in opt.param_groups for p in group["params"]]
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith(f"opt.{name}."):
                    idx, field = key[len(name) + 5:].split(".", 1)
                    param = params[int(idx)]
                    if value.shape == param.shape:  # the file holds NCHW; fused SGD reads the
                        value = torch.empty_like(param).copy_(value)  # buffer in the weight's layout
                    state.setdefault(int(idx), {})[field] = value
            opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        key = _rng_key(dist.rank())
        check_processes(path, meta, dist.world_size())
        if key not in tensors:
            raise TrainingError(f"{path}: no random state for rank {dist.rank()} (damaged). Fix: "
                                "start a new run with another --out.")
        self.generator.set_state(tensors[key])
        self.step = self.saved_step = int(meta["step"])
        pick = meta.get("student_pick") or {}
        if pick.get("step") is not None:
            self.pick = StudentPick(int(pick["step"]), float(pick["score"]),
                                    {k[5:]: v for k, v in tensors.items() if k.startswith("pick.")})

    # --- the whole run -----------------------------------------------------------
    def run(self, progress: bool = True) -> None:
        """Train until the schedule ends, saving state every `save_every` steps."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        main = dist.is_main()
        log_path = self.out_dir / "losses.csv" if main else Path(os.devnull)
        logged = _continue_log(log_path, LOSS_FIELDS, self.step) if main else []
        val_path = self.out_dir / VALIDATION_CSV
        if self.validation_set is None:
            val_path = Path(os.devnull)
        else:
            self.validation = _continue_log(val_path, VALIDATION_FIELDS, self.step)
        checkpoints = set(validation_steps(self.config))
        cfg = self.config
        bar = tqdm(total=cfg.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not (progress and main), dynamic_ncols=True)
        # the bar closes whatever happens, so an error is printed on a line of its own
        with open(log_path, "a", newline="") as fh, bar, open(val_path, "a", newline="") as val_fh:
            writer, val_writer = csv.writer(fh), csv.writer(val_fh)
            # seconds count on from the last row logged before a resume
            start = time.perf_counter() - (logged[-1]["seconds"] if logged else 0.0)
            while self.step < cfg.total_steps:
                if self._compiles_next():  # else the bar stands still for minutes on a CPU
                    bar.set_postfix_str("compiling this stage (once; minutes on a CPU)")
                out = self.train_step()
                bar.update(1)
                bar.set_postfix(stage=out["stage"], loss=f"{out['loss']:.4f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                    writer.writerow([self.step, out["stage"], f"{out['loss']:.6f}",
                                     out.get("cosine", ""), out.get("focal", ""), out.get("l1", ""),
                                     f"{time.perf_counter() - start:.1f}"])
                    fh.flush()
                if self.step in checkpoints:
                    self.validate(val_writer)
                    val_fh.flush()
                if self.step % cfg.save_every == 0 or self.step == cfg.stage1_steps:
                    self.save_state()
        dist.sync_state(self.model)
        if self.saved_step != self.step:
            self.save_state()

    def calibrate_threshold(self, good_images: torch.Tensor, source: str) -> Thresholds:
        """Image and pixel thresholds at false-alarm rates on good images (uint8,
        ideally never trained on), checked against the run's synthetic defects on
        them; see pfadseg.calibration."""
        return calibrate(self.model, good_images, self.synthesizer, self.config.seed,
                         bf16=self.use_bf16, source=source)


def _report_validation(trainer: Trainer, out_dir: Path) -> dict | None:
    """The run's last validation figures and warnings: logged, written to
    validation.json, returned for the checkpoint's metadata (None: nothing validated,
    as when too few images were given to hold any out)."""
    rows, cfg = trainer.validation, trainer.config
    if not rows:
        (out_dir / VALIDATION_JSON).unlink(missing_ok=True)  # an earlier run's, in the same folder
        return None
    warnings = assess(rows, cfg.stage1_steps)
    for warning in warnings:
        log.warning(warning)
    stage1 = [r for r in rows if r["step"] <= cfg.stage1_steps]
    report = {"final": rows[-1], "end_of_stage1": stage1[-1] if stage1 else None,
              "student_step": trainer.pick.step or cfg.stage1_steps,
              "warnings": warnings, "points": len(rows), "images": len(trainer.validation_set.labels),
              "defect_images": int(trainer.validation_set.labels.sum())}  # synthetic, on the good ones
    write_text(out_dir / VALIDATION_JSON, json.dumps(report, indent=2))
    return report


def _rng_key(rank: int) -> str:
    """State-file key of a rank's generator state ("rng" for rank 0, as one process writes)."""
    return "rng" if rank == 0 else f"rng.{rank}"


def _continue_log(log_path: Path, header: list[str], step: int) -> list[dict[str, float]]:
    """A CSV log whose first column is the step, ready to append to at `step`: started
    anew at step 0 (or when missing or empty), else trimmed of the rows after `step`
    (a killed run may have logged steps it never saved); returns the rows kept."""
    rows: list[list[str]] = []
    if step > 0 and log_path.is_file():
        with open(log_path, newline="") as fh:
            text = fh.read()
        rows = list(csv.reader(text.splitlines()))
    if not rows:  # a new log, or one left empty: written with its header alone
        text, rows = "", [header]
    if rows[0] != header:
        raise TrainingError(f"{log_path}: its first row is not the header ({','.join(header)}). "
                            "Fix: restore the file, or delete it (its rows before the resume are "
                            "then lost; training goes on).")
    keep = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit()
                       and int(r[0]) <= step]  # a row cut short by a kill goes too
    if len(keep) != len(rows) or not text.endswith("\n"):
        with replacing(log_path) as tmp, open(tmp, "w", newline="") as fh:  # a kill here keeps the log
            csv.writer(fh).writerows(keep)
    try:
        return [{k: int(v) if k in ("step", "stage") else float(v) if v else float("nan")
                 for k, v in zip(keep[0], r)} for r in keep[1:]]
    except ValueError as exc:
        raise TrainingError(f"{log_path}: a value is not a number ({exc}). Fix: restore the "
                            "file, or delete the rows after the last good one.") from exc


def _unfinished(state_path: Path) -> bool:
    """True when a state file stops before the end of its own schedule (or is unreadable)."""
    try:
        meta = ckpt.read_meta(state_path, kind=STATE_FORMAT)
        return int(meta["step"]) < TrainConfig.from_dict(meta["train"]).total_steps
    except (ckpt.CheckpointError, KeyError, TypeError, ValueError):
        return True


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse a run folder that would clash with `train`, before any heavy work: a
    file in its place, --resume without a readable state file, or a new run over
    an unfinished or a finished one (its checkpoint, and the calibrated copy and
    ONNX export made from it, would be lost or left beside another model)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"--out {out_dir} is a file, not a folder. Fix: give a folder for "
                            "the run (it is created if missing).")
    if (pid := _running(out_dir)) is not None:  # said to be running, not taken for a stopped run
        raise TrainingError(_running_message(out_dir, pid))
    state_path, checkpoint = out_dir / STATE_NAME, out_dir / CHECKPOINT_NAME
    if resume:
        if not state_path.is_file() and checkpoint.is_file():
            raise TrainingError(f"--resume: the run in {out_dir} is finished ({checkpoint}); "
                                "nothing to resume. Fix: choose another --out for a new run.")
        if not state_path.is_file():
            raise TrainingError(f"--resume: no state file {state_path} to resume from. Fix: "
                                "drop --resume to start a new run.")
        try:
            ckpt.read_meta(state_path, kind=STATE_FORMAT)
        except ckpt.CheckpointError as exc:
            raise TrainingError(f"{str(exc).rstrip('.')}. Fix: delete {state_path} to start the "
                                "run over, or choose another --out.") from exc
    elif state_path.is_file() and _unfinished(state_path):
        raise TrainingError(f"{out_dir} holds an unfinished run ({state_path}). Fix: add "
                            "--resume to continue it, or choose another --out.")
    elif state_path.is_file() and not checkpoint.is_file():
        raise TrainingError(f"{out_dir} holds a run that trained to its end but stopped before "
                            f"writing its checkpoint ({state_path}). Fix: add --resume to write "
                            "it, or choose another --out.")
    elif checkpoint.is_file():
        raise TrainingError(f"{out_dir} holds a finished run ({checkpoint}). "
                            "Fix: choose another --out, or delete that folder to train it again.")
    elif made := sorted(p.name for p in out_dir.glob(f"{checkpoint.stem}.*") if p.is_file()):
        raise TrainingError(f"{out_dir} holds files made from an earlier run's checkpoint ("
                            f"{', '.join(made)}): a new run would leave them beside another model. "
                            "Fix: choose another --out, or delete them.")


# what a resumed run keeps from the run it continues: setting -> where that run holds it
# (its state file's "model" and "train" settings, or its config.json)
RESUMED = {"teacher": "model", "image_size": "model",
           **{name: "train" for name in ("batch_size", "stage1_steps", "stage2_steps", "lr_student",
                                         "lr_schedule", "student_checks", "seed", "save_every")},
           **{name: "run" for name in ("train_dir", "category", "preset", "rotation", "textures",
                                       "texture_limit")}}
PATHS = ("train_dir", "textures")  # compared as absolute paths


def check_processes(path: Path, meta: dict, processes: int) -> None:
    """A state file resumes only with the number of processes that wrote it: each
    rank's random generator is in it."""
    if int(meta.get("world_size", 1)) != processes:
        raise TrainingError(f"{path} was written by a run of {meta.get('world_size', 1)} "
                            f"process(es), not {processes}. Fix: resume with the same "
                            "number of processes (torchrun --nproc-per-node).")


def resumed_settings(out_dir: Path, given: dict[str, object], defaults: dict[str, object]) -> dict:
    """The settings of a resumed run, which cannot change half-way: each setting of
    RESUMED and MODULES left at its default takes the run's value; one given with
    another value is refused, naming it (a setting given with its default value counts
    as left out). bf16, compiling and the device are not among them: they may change."""
    out_dir = Path(out_dir)
    meta = ckpt.read_meta(out_dir / STATE_NAME, kind=STATE_FORMAT)
    check_processes(out_dir / STATE_NAME, meta, dist.processes())
    config = out_dir / "config.json"
    try:  # a run without one recorded only the state's settings: only those are checked
        run = json.loads(config.read_text()) if config.is_file() else {}
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise TrainingError(f"{config}: damaged ({exc}); it records the images and settings the "
                            "run started with. Fix: delete it and give the run's images, preset, "
                            "rotation and textures again (--train-dir or --data --category, "
                            "--preset, --rotation, --textures; they are then taken as given).") from exc
    saved = {"model": meta["model"], "train": meta["train"], "run": run}
    differ, kept = [], {}
    was = {m: meta["model"][m] for m in MODULES}
    wanted = {**was, **{m: given[m] for m in MODULES if given.get(m) not in (None, defaults.get(m))}}
    if wanted != was:
        differ.append(f"model {variant_name([m for m in MODULES if wanted[m]])} (the run's: "
                      f"{variant_name([m for m in MODULES if was[m]])})")
    kept.update(was)
    for name, where in RESUMED.items():
        if name not in saved[where]:
            continue
        value, run_value = given.get(name), saved[where][name]
        if name in PATHS and run_value is not None:
            run_value = Path(run_value).resolve()
            value = value and Path(value).resolve()
        if name == "category" and run_value is not None:  # runs from before: "bottle/" as typed
            with contextlib.suppress(DataError):
                run_value = category_name(run_value)
        if value is not None and value != defaults.get(name) and str(value) != str(run_value):
            differ.append(f"--{name.replace('_', '-')} {value} (the run's: "
                          f"{'none' if run_value is None else run_value})")
        kept[name] = run_value
    if differ:
        raise TrainingError(f"--resume continues the run in {out_dir} with the settings it started "
                            f"with; these differ: {', '.join(differ)}. Fix: leave them out, or start "
                            "a new run with another --out.")
    return kept


def check_same_images(out_dir: Path, names: tuple[str, ...]) -> None:
    """A resumed run must train on the image files it started with (compared by name):
    the held-out split is drawn by position, so an added or removed file would hold out
    trained-on images and set the thresholds on them. Runs whose config.json lists no
    images (from before it did) pass."""
    try:
        recorded = json.loads((out_dir / "config.json").read_text()).get("images")
    except (OSError, ValueError, AttributeError):  # a damaged one: resumed_settings names it
        return
    if not names or not isinstance(recorded, list) or recorded == list(names):
        return
    gone = sorted(set(recorded) - set(names))
    new = sorted(set(names) - set(recorded))
    what = [f"{len(gone)} gone (e.g. {gone[0]})" if gone else "",
            f"{len(new)} new (e.g. {new[0]})" if new else ""]
    raise TrainingError(f"--resume: the training images changed since the run in {out_dir} "
                        f"started: {', '.join(w for w in what if w) or 'another order'}. The "
                        "images held out for the thresholds would then include trained-on ones. "
                        "Fix: restore the folder as it was, or start a new run with another --out.")


def run_lock(out_dir: Path) -> contextlib.AbstractContextManager:
    """One training run in a folder at a time: an OS lock on out_dir/.lock, held by
    rank 0 while it trains and released when it ends, also when it is killed. A
    second `train` there (a benchmark rerun beside a job its killed parent left,
    or two commands given one --out) would write the same files."""
    if fcntl is None or not dist.is_main():
        return contextlib.nullcontext()
    return _flock(Path(out_dir))


def _running(out_dir: Path) -> str | None:
    """The process id in out_dir/.lock while a run holds it (read only: a read-only
    folder is checked too), else None."""
    path = Path(out_dir) / ".lock"
    if fcntl is None or not dist.is_main() or not path.is_file():  # torchrun: rank 0's lock
        return None
    try:
        with open(path) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return fh.read().strip()
    except OSError:
        return None
    return None


def _running_message(out_dir: Path, pid: str) -> str:
    return (f"{out_dir}: another pfadseg train is running in it (process {pid or 'unknown'}). "
            "Fix: let it finish or stop it, or choose another --out.")


@contextlib.contextmanager
def _flock(out_dir: Path) -> Iterator[None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise TrainingError(_running_message(out_dir, fh.read().strip())) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def train(model_config: ModelConfig, train_config: TrainConfig, data: TrainData, out_dir: Path,
          teacher_weights: str | Path | None = None, resume: bool = False, progress: bool = True,
          extra_meta: dict | None = None, device: str | torch.device = "auto") -> Path:
    """Train a model and write out_dir/checkpoint.safetensors; returns its path.

    Under torchrun each process trains on its share of every batch and rank 0
    alone writes files; `device` "cuda" then means this rank's GPU."""
    out_dir = Path(out_dir)
    device = dist.setup(resolve_device(device))
    check_out_dir(out_dir, resume)
    with run_lock(out_dir):
        state_path = out_dir / STATE_NAME
        if dist.is_main():  # half-written files of a run killed while saving (100s of MB)
            for stale in [*out_dir.glob(f"{STATE_NAME}*.tmp"), *out_dir.glob(f"{CHECKPOINT_NAME}*.tmp")]:
                stale.unlink(missing_ok=True)
        if resume:  # the run's own schedule; bf16 and compiling may be turned off for the rest
            kept = TrainConfig.from_dict(ckpt.read_meta(state_path, kind=STATE_FORMAT)["train"])
            train_config = replace(kept, bf16=kept.bf16 and train_config.bf16,
                                   compile=kept.compile and train_config.compile,
                                   compile_stage1=kept.compile_stage1 and train_config.compile_stage1)
            check_same_images(out_dir, data.names)
        torch.manual_seed(train_config.seed)
        train_idx, held_idx = held_out_split(len(data.images), train_config.seed)
        held_out = data.images[held_idx]  # for calibration only: never trained on
        data = replace(data, images=data.images[train_idx])
        # a resumed run's teacher comes from its state file: nothing to download or give again
        model = AnomalyModel.build(model_config, RANDOM if resume else teacher_weights)
        trainer = Trainer(model, train_config, data, out_dir, device, held_out)
        if resume:
            trainer.load_state(state_path)
            log.info("resumed at step %d of %d", trainer.step, train_config.total_steps)
        out_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_main():
            write_text(out_dir / "config.json", json.dumps(
                {"model": model.config.to_dict(), "train": train_config.to_dict(),
                 "processes": dist.world_size(), **(extra_meta or {}),
                 **({"images": list(data.names)} if data.names else {}),
                 # what else a seed's result depends on (kernels differ with each of them)
                 "runtime": {"device": str(device), "bf16": trainer.use_bf16, "threads": torch.get_num_threads(),
                             "torch": torch.__version__}}, indent=2))
        trainer.run(progress)
        path = out_dir / CHECKPOINT_NAME
        if dist.is_main():
            if len(held_out):
                thresholds = trainer.calibrate_threshold(held_out, "held-out good images")
            else:  # too few images to hold any out
                log.warning("%d training images are too few to hold any out (8 or more are needed): "
                            "the thresholds come from the training images and may flag too little. "
                            "Fix: pfadseg calibrate --checkpoint %s --good DIR with other good images.",
                            len(data.images), path)
                thresholds = trainer.calibrate_threshold(data.images, "training images (too few to "
                                                         "hold any out)")
            meta = dict(extra_meta or {})
            validation = _report_validation(trainer, out_dir)
            if validation is not None:
                meta["validation"] = validation
            ckpt.save_checkpoint(model.cpu(), path, train_config.to_dict(), thresholds, meta)
            state_path.unlink(missing_ok=True)  # a finished run resumes no more: free its 100s of MB
        dist.barrier()
        return path


def train_folder(model_config: ModelConfig, preset_name: str, train_dir: Path, out_dir: Path, *,
                 schedule: dict[str, object] | None = None, textures: Path | None = None,
                 texture_limit: int | None = None, rotation: str = "auto", category: str | None = None,
                 skip_bad: bool = False, teacher_weights: str | Path | None = None, resume: bool = False,
                 progress: bool = True, announce: bool = False, device: str | torch.device = "auto") -> Path:
    """`train` on a folder of good images with a preset's schedule (`schedule`
    overrides its fields): what `pfadseg train` and Detector.train run. The folder
    settings go into config.json and the checkpoint, for --resume and `pfadseg test`;
    `announce` prints what is trained on which images."""
    train_dir = Path(train_dir)
    category = category_name(category) if category else category_of(train_dir)
    train_config = preset(preset_name, **(schedule or {}))  # bad overrides fail before images load
    check_out_dir(Path(out_dir), resume)  # and so do a finished run's folder and a batch
    check_aff_batch(model_config.aff, dist.split_batch(train_config.batch_size, dist.processes()),
                    train_config)  # torchrun cannot split, or splits too small for AFF
    data = TrainData.from_folder(train_dir, model_config.image_size, textures, texture_limit, rotation,
                                 category, skip_bad=skip_bad, progress=progress)
    if announce and dist.is_main():
        held = held_out_count(len(data.images))
        print(f"training {model_config.variant} ({model_config.teacher} teacher) on "
              f"{len(data.images) - held} of the {len(data.images)} images in {train_dir} ({held} held "
              f"out for the thresholds), preset {preset_name}, rotation {data.rotation}", file=sys.stderr)
    return train(model_config, train_config, data, Path(out_dir), teacher_weights=teacher_weights,
                 resume=resume, progress=progress, device=device,
                 extra_meta={"category": category, "train_dir": str(train_dir.resolve()),
                             "preset": preset_name, "rotation": data.rotation,
                             "textures": textures and str(Path(textures).resolve()),
                             "texture_limit": texture_limit})
