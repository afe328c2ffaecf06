"""The training run: stages, checkpoints, resume, metrics.

    result = Trainer(config).run()

A stage (`stage.StageRun`) trains one method on per-domain minibatches with AdamW, linear
warm-up and cosine decay; a new stage gets a new optimizer and starts from the previous
stage's weights. After every epoch the seen domains' validation split and the held-out domains
are scored (Dice and IoU per domain), `last.pt` is replaced (atomically) and one line is
appended to `metrics.jsonl`; `best.pt` keeps the final stage's best epoch by the mean Dice of
the seen domains' validation (never the held-out ones). `--resume` restarts from `last.pt` at
the same step with the same optimizer, scheduler and RNG state, so a killed run loses at most
one epoch and continues exactly as if it had not been killed.

Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (NCCL on
GPUs, gloo on CPUs), each rank samples its own patches, and rank 0 validates and writes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import HistodgError
from ..device import place_model
from ..files import append_text, write_json_atomic, write_text_atomic
from ..locks import run_lock
from ..model.build import build_model
from ..model.checkpoint import Payload, load_checkpoint, save_checkpoint
from ..model.config import ModelConfig, Normalization
from ..model.domain_bn import load_model_state
from ..model.normalize import Normalizer
from .config import TrainConfig
from .data import label_set, load_stores
from .methods import METHODS, SegTask, parse_hparams
from .shift_reference import shift_reference
from .splits import Stage, plan_stages
from .stage import NonFiniteLoss, StageRun
from .stain_reference import stain_reference
from .state import Runtime, TrainState, all_rng_states, on_rank0, params_checksum, resolve_runtime
from .validation import ScoreSettings, score_domains

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json", "result.json", "curves.png")


class TrainError(HistodgError):
    """Training cannot start or had to stop."""


@dataclass
class Callbacks:
    """Hooks for a live view (the CLI) and for tests; all optional."""

    on_stage_start: Callable | None = None  # (stage, model, steps_total) -> None
    on_step: Callable | None = None  # (dict) -> None
    on_epoch: Callable | None = None  # (record dict) -> None
    on_note: Callable | None = None  # (one line: a stale lock of the run folder was taken over) -> None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks: Callbacks | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.cb = callbacks or Callbacks()
        self._resume_model_state = None
        self.method_class = METHODS[cfg.method]  # its run-level contract: checks, slots, what goes on between stages
        self.hparams = parse_hparams(self.method_class, cfg.hparams)

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_dir(self, rt: Runtime, stages: list[Stage]) -> TrainState:
        last = self.out / "last.pt"
        # a run that stopped before its first last.pt saved nothing worth keeping: a rerun (or
        # --resume) starts it again from the beginning
        unsaved = (self.out / "config.json").exists() and not last.exists()
        if self.resume and not unsaved:
            if not last.is_file():
                raise TrainError(self.out, "nothing to resume: no last.pt here")
            ckpt = load_checkpoint(last)
            if ckpt.get("done"):
                raise TrainError(self.out, "this run is finished (result.json); nothing to resume")
            self._check_same_stages(stages)
            self._resume_model_state = ckpt["model_state"]
            return TrainState.from_checkpoint(ckpt)
        if (self.out / "config.json").exists() or last.exists():
            if not self.overwrite and not unsaved:
                raise TrainError(self.out, "a run exists here: use --resume to continue it or --overwrite to start again")
            if rt.main:
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
                for p in self.out.glob("stage*.pt"):
                    p.unlink()
        return TrainState()

    def _model(self, classes: int, rt: Runtime):
        cfg = self.cfg
        torch.manual_seed(cfg.seed + rt.rank)
        np.random.seed(cfg.seed + rt.rank)
        model = build_model(cfg.arch, cfg.encoder, cfg.encoder_weights, classes)
        if why := self.method_class.refuse_model(model, self.hparams):
            # the same words whether dsbn came from the user or from the default: the config cannot tell which
            default = ", and dsbn is the default method: add --method erm, or" if cfg.method == "dsbn" else ":"
            raise TrainError(f"--method {cfg.method}", f"{cfg.arch}-{cfg.encoder} {why}{default} choose a ResNet or "
                                                       f"EfficientNet encoder")
        return place_model(model, rt.placement)

    def run(self) -> dict:
        cfg = self.cfg
        rt = resolve_runtime(cfg, TrainError)
        stores = load_stores(cfg.stores)  # every store checked before anything trains
        stages = plan_stages(stores, cfg.stage_axes, cfg.val_domains, cfg.val_fraction, cfg.seed)
        stain = stain_reference(cfg, stages, TrainError)  # fitted (or refused) before anything is written
        labels = label_set(stores)
        classes = 1 if len(labels) <= 2 else max(labels) + 1
        task = SegTask(classes=classes, loss=cfg.loss)
        model = self._model(classes, rt)  # built (and a method it cannot take refused) before the folder is touched
        self.model_config = ModelConfig(
            arch=cfg.arch, encoder=cfg.encoder, classes=classes, labels={str(k): v for k, v in labels.items()},
            mpp=stores[0].attrs.mpp, tile_size=stores[0].attrs.tile_size, method=cfg.method, hparams=dict(cfg.hparams),
            loss=cfg.loss, augmentation={"preset": cfg.augment, **cfg.augmentation.to_dict()},
            normalization=Normalization(stain=stain),
            domain_bn=self.method_class.recorded_domains(self.hparams, stages[-1].domain_names),
            trained_on=trained_on(cfg, stores, stages))
        # one writer per run folder: a second `histodg train` into it is refused while this one runs
        # (rank 0 holds the lock; a refusal reaches every rank)
        with ExitStack() as held:
            on_rank0(rt, lambda: held.enter_context(run_lock(self.out, TrainError, self.cb.on_note)), TrainError)
            return self._run_in_folder(model, task, stores, stages, rt)

    def _run_in_folder(self, model, task, stores, stages, rt: Runtime) -> dict:
        cfg = self.cfg
        if rt.main:
            self.out.mkdir(parents=True, exist_ok=True)
        st = self._prepare_dir(rt, stages)
        if rt.world > 1:
            torch.distributed.barrier()  # every rank has looked at the folder before rank 0 writes
        if self._resume_model_state is not None:
            load_model_state(model, self._resume_model_state)
        if rt.main:
            write_json_atomic(self.out / "config.json", {**cfg.to_dict(), "resolved": {
                "model": self.model_config.to_dict(), "device": str(rt.device), "amp": str(rt.placement.amp_dtype),
                "channels_last": rt.placement.channels_last, "world_size": rt.world,
                "stores": [str(s.path) for s in stores], "stages": [s.summary() for s in stages]}})
            write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in st.history))
        for stage in stages[st.stage:]:
            if stage.index:  # what the last stage learned goes on (a DSBN slot of the same domain: organ -> union)
                self.method_class.between_stages(model, self.hparams, stages[stage.index - 1].domain_names,
                                                 stage.domain_names)
            self._run_stage(stage, len(stages), model, task, rt, st)
            st.next_stage(stage.index)
            rng = all_rng_states(rt)  # every rank's, gathered by every rank
            if rt.main:
                save_checkpoint(self.out / f"stage{stage.index + 1}.pt", self._stage_payload(model, st, stage))
                save_checkpoint(self.out / "last.pt", self._payload(model, st, final=False, rng=rng))
        result = self._finish(model, stages, st, rt)
        if rt.world > 1:
            torch.distributed.barrier()
        return result

    # -- one stage -------------------------------------------------------------------------------
    def _run_stage(self, stage: Stage, n_stages: int, model, task, rt: Runtime, st: TrainState) -> None:
        run = StageRun(self.cfg, stage, model, task, rt, st, self.model_config.normalization)
        if self.cb.on_stage_start:
            self.cb.on_stage_start(stage, model, run.total)
        final_stage = stage.index == n_stages - 1

        def on_epoch_end(run: StageRun, epoch: int, record: dict) -> None:
            rng = all_rng_states(rt)  # every rank's random state goes into last.pt, so a resume continues each
            if rt.main:
                self._end_epoch(run, epoch, record, final_stage, rng)
            else:
                st.epoch = epoch + 1
            if rt.world > 1:
                torch.distributed.barrier()

        try:
            run.run(on_epoch_end, self.cb.on_step)
        except NonFiniteLoss as exc:
            dl = exc.logs.get("domain_losses") or []
            bad = [stage.domain_names[i] for i, v in enumerate(dl) if not math.isfinite(v)]
            where = f"batch of domain {', '.join(bad)}" if bad else "batch of every domain"
            kept = ("last.pt (end of the previous epoch) is intact" if (self.out / "last.pt").is_file()
                    else "no checkpoint was written yet (the same command starts it again)")
            raise TrainError(self.out, f"loss is not finite at stage {stage.index + 1} ({stage.axis}), step "
                                       f"{st.global_step + 1}, {where}; stopped, {kept}") from None

    def _end_epoch(self, run: StageRun, epoch: int, record: dict, final_stage: bool, rng: dict) -> None:
        """Validate, keep the best, write last.pt and the metrics line (rank 0)."""
        st, stage = run.st, run.stage
        record["val"] = self.validate(run, stage.val)
        record["heldout"] = self.validate(run, stage.heldout)
        # no validation split: the last epoch is the best one
        score = record["val"]["mean_domain_dice_pixels"] if stage.val else float(epoch)
        st.history.append(record)
        st.epoch = epoch + 1
        st.optimizer, st.scheduler = run.optimizer.state_dict(), run.scheduler.state_dict()
        st.method_extra = run.method_state()
        if final_stage and score > st.best:
            st.best = score
            record["best"] = True
            save_checkpoint(self.out / "best.pt", self._payload(run.model, st, final=False, light=True, record=record))
        save_checkpoint(self.out / "last.pt", self._payload(run.model, st, final=False, rng=rng))
        append_text(self.out / "metrics.jsonl", json.dumps(record) + "\n")
        if self.cb.on_epoch:
            self.cb.on_epoch(record)

    def validate(self, run: StageRun, parts_by_domain: dict) -> dict:
        cfg, names = self.cfg, run.stage.domain_names

        def index(name):  # a seen domain by its index in the stage, a held-out one as None
            return names.index(name) if name in names else None

        settings = ScoreSettings(run.task.binary, max(8, 2 * cfg.batch_size), cfg.val_max_patches, cfg.workers)
        return score_domains(run.model, parts_by_domain, run.normalizer, run.rt, settings,
                             lambda name: run.method.evaluation_route(index(name)),
                             lambda name: run.method.own_statistics(index(name)))

    # -- output --------------------------------------------------------------------------------
    def _payload(self, model, st: TrainState, final: bool, light: bool = False, record: dict | None = None,
                 rng: dict | None = None, config=None) -> Payload:
        """A checkpoint of `model` at `st` (`model.checkpoint.Payload`), with this run's model config
        unless `config` is given."""
        return st.payload(model, config or self.model_config, self.cfg.to_dict(), final, light, record, rng)

    def _check_same_stages(self, stages: list[Stage]) -> None:
        """A resumed run goes on with the stages it was started with: a run begun by a histodg whose
        default protocol was another (one union stage before the end of 2026-12-07) is refused."""
        from ..files import read_json

        try:
            began = [s["axis"] for s in read_json(self.out / "config.json")["resolved"]["stages"]]
        except (OSError, ValueError, KeyError, TypeError):
            return  # no record of its stages to compare (a run of an older histodg still resumes)
        now = [s.axis for s in stages]
        if began != now:
            raise TrainError(self.out, f"this run was started with the stages {' -> '.join(began)}, and these settings "
                                       f"plan {' -> '.join(now)}: finish it with the histodg that began it, "
                                       f"or start again with --overwrite")

    def _stage_payload(self, model, st: TrainState, stage: Stage) -> Payload:
        """stageN.pt: the weights after stage N, its config naming that stage's own slots (a DSBN
        model's stage 1 has the organ slots, whatever the last stage's are)."""
        config = self.model_config
        if config.domain_bn:
            config = dataclasses.replace(config, domain_bn=self.method_class.recorded_domains(self.hparams,
                                                                                            stage.domain_names))
        return self._payload(model, st, final=False, light=True, config=config)

    def _describe_domains(self, model, stages, rt: Runtime, st: TrainState, last: dict) -> None:
        """The training domains' description (`model.shift`) into best.pt and, for the final
        weights, into the model config last.pt gets; best.pt's own weights when they differ.
        Every rank describes its share of the stores (`shift_reference(rt=...)`); rank 0 writes."""
        norm = self.model_config.normalization
        normalizer = Normalizer(norm.mean, norm.std, rt.device, rt.placement.channels_last, norm.stain)
        slots = self.model_config.domain_bn

        def describe(net):
            return shift_reference(net, normalizer, stages, rt.device, domain_bn=slots, placement=rt.placement, rt=rt)

        net = getattr(model, "module", model)
        if rt.world > 1:  # rank 0's BatchNorm statistics (what it saves) on every rank: each rank's own last batch moved its own
            for buf in net.buffers():
                torch.distributed.broadcast(buf, src=0)
        final = describe(model)
        best_path = self.out / "best.pt"
        loaded = []  # rank 0: best.pt, to write its description into

        def best_weights():  # best.pt's weights when they are not the final ones
            if not best_path.exists():
                return None
            loaded.append(load_checkpoint(best_path))
            current = net.state_dict()
            same = all(torch.equal(v, current[k].detach().cpu()) for k, v in loaded[0]["model_state"].items())
            return None if same else loaded[0]["model_state"]

        other_weights = on_rank0(rt, best_weights, TrainError)  # to every rank: no shared disk needed
        best = loaded[0] if loaded else None
        ref = final
        if other_weights is not None:
            other = copy.deepcopy(net)
            other.load_state_dict(other_weights)
            ref = describe(other)
        self.model_config = self.model_config.replace(shift=final)
        if not rt.main:
            return
        if best is not None:
            best["model_config"] = self.model_config.replace(shift=ref).to_dict()
            save_checkpoint(best_path, best)
        else:
            save_checkpoint(best_path, self._payload(model, st, final=True, light=True, record=last))

    def _finish(self, model, stages, st: TrainState, rt: Runtime) -> dict:
        checks = [params_checksum(model)]
        if rt.world > 1:
            gathered: list = [None] * rt.world
            torch.distributed.all_gather_object(gathered, checks[0])
            checks = gathered
        last = st.history[-1] if st.history else {}
        self._describe_domains(model, stages, rt, st, last)  # every rank: each describes its share of the stores
        if not rt.main:
            return {}
        result = {"run_dir": str(self.out), "stages": [s.summary() for s in stages], "epochs_run": len(st.history),
                  "global_step": st.global_step, "final": last,
                  "best_val_dice": st.best if any(s.val for s in stages) else None,
                  "world_size": rt.world, "param_checksums": checks}
        save_checkpoint(self.out / "last.pt", self._payload(model, st, final=True))
        write_json_atomic(self.out / "result.json", result)
        try:
            from .curves import plot_curves

            plot_curves(st.history, self.out / "curves.png")
        except Exception as exc:  # a plot must never fail a finished run
            write_text_atomic(self.out / "curves.error.txt", str(exc))
        return result


def trained_on(cfg: TrainConfig, stores, stages) -> dict:
    """The model card's data (`ModelConfig.trained_on`): the stores as given, how many stores and
    patches of each organ and scanner (a total per pair, not a list: a data set may be thousands
    of small stores), those of `--val-domain` apart (held out), the stages, the command line."""
    pairs: dict = {}
    held = set(cfg.val_domains)  # --val-domain: scored, never trained on
    for s in stores:
        row = pairs.setdefault((s.organ, s.scanner), {"organ": s.organ, "scanner": s.scanner, "stores": 0, "patches": 0,
                                                      "held_out": s.organ in held or s.scanner in held})
        row["stores"] += 1
        row["patches"] += s.n
    rows = [pairs[k] for k in sorted(pairs)]
    return {"stores": list(cfg.stores), "domains": [r for r in rows if not r["held_out"]],
            "held_out": [r for r in rows if r["held_out"]], "stages": [s.summary() for s in stages], "command": cfg.command}
