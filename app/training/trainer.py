"""The training loop, in every softmax mode (`full`, `sampled`, `knn`).

Legend: b = this rank's batch, N = global batch (P * b), D = embedding dim.

Three phases with different communication rules:
- construction (`Trainer(...)`) reads the config, the dataset and the world and communicates
  nothing, so the entry point can agree on a set-up error before any collective
  (`mpi.agree.agree`);
- `open_run_dir()` (collective) locks the run directory on rank 0 and checks it; `restore()`
  (collective) continues from the checkpoint rank 0 chose; `release()` unlocks at the end;
- `run()` (collective from its first line): start (broadcast, run directory, initial rows and
  graph), then per step `_step` (forward, backward, updates) and `_after_step` (metrics,
  evaluation, checkpoint, stop request), then `_finish` (summary).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from app import checkpoint
from app.backbones import augment_images
from app.classifier.centres import imprint, starts_imprinted, train_centres
from app.config import Config, config_hash, config_to_yaml
from app.evaluate import evaluate
from app.knn import GraphRefresher
from app.model import as_input, build_model
from app.runlog import JsonLines, peak_rss_mb, progress_bar
from app.training import data_parallel, init_from, optimizers, pipeline
from app.training.precision import backbone_features
from app.training.metrics import MetricsWindow
from app.training.plan import make_run_plan
from app.training.run_dir import RunLock, check_run_dir, prepare_run_dir, repair_logs
from app.training.schedule import LRSchedule
from app.training.stop import StopRequest, mpirun_sigterm_warning
from common.files import write_text_atomic
from data_prep.lineage import ancestor_of
from data_prep.reader import ShardedReader
from mpi.agree import agree, decide_on_root

# train.on_nonfinite=skip: the run stops (as with `stop`) at this many skipped steps in a row.
MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite and train.on_nonfinite stops the run (`stop`, or
    MAX_CONSECUTIVE_SKIPS skipped steps in a row). Raised on every rank at the same step (the
    loss is the global-batch mean, identical on every rank), after the forward pass and before
    any weight changed; the message is one line naming the step."""


class Trainer:
    """One training run in `cfg.out_dir`; see the module docstring."""

    def __init__(self, world, cfg: Config, resume: bool, log, init_source: str | None = None):
        self.world, self.cfg, self.log, self.resume = world, cfg, log, resume
        self.run_dir = Path(cfg.out_dir)
        self.start_step = 0
        self.resumed_from: Path | None = None
        # --init-from: the source given, then the checkpoint started from (init_from.Source).
        self.init_source, self.started_from = init_source, None
        if init_source is not None:
            init_from.check_config(cfg)
        elif not resume:
            init_from.check_unused(cfg)
        self.lock: RunLock | None = None
        self.reader = ShardedReader(cfg.data.path, "train", world.rank, world.size,
                                    cfg.train.batch_size, cfg.seed, prefetch=cfg.data.prefetch)
        self.val_reader = ShardedReader(cfg.data.path, "val", world.rank, world.size,
                                        cfg.train.eval_batch_size, cfg.seed, shuffle=False,
                                        drop_last=False, prefetch=cfg.data.prefetch)
        if cfg.softmax.mode == "knn" and cfg.softmax.k > self.reader.num_classes:
            raise ValueError(f"softmax.k: {cfg.softmax.k} is larger than the dataset's "
                             f"{self.reader.num_classes} classes; set softmax.k <= "
                             f"{self.reader.num_classes}")
        self.plan = make_run_plan(world, cfg, self.reader.num_classes,
                                  self.reader.batches_per_epoch)
        if world.device.type != "cpu":
            log.warning("this rank sees %s, but the trainer computes on the CPU in this "
                        "version (GPU placement is not implemented yet)", world.device)
        self.backbone, self.classifier, self.dtype = build_model(
            world, cfg, self.reader.input_shape, self.reader.num_classes)
        self.optimizer = data_parallel.build_backbone_optimizer(world, self.backbone, cfg.optim,
                                                                cfg.comm)
        # comm.gradients=sparse: this rank's residuals (and DGC momenta); None when dense.
        self.sparse = data_parallel.build_sparse_exchange(world, self.backbone, cfg.comm,
                                                          cfg.optim, cfg.seed)
        # comm.overlap: the micro-batched, overlapping step (app/training/pipeline.py) or None.
        self.pipeline = pipeline.build(cfg.comm, self.classifier, self.sparse)
        self.schedule = LRSchedule(cfg.optim.lr, cfg.schedule, cfg.train.steps)
        self.classifier_lr_ratio = (cfg.optim.classifier_lr or cfg.optim.lr) / cfg.optim.lr
        self.graphs = None
        self._dataset = None  # the manifest's dataset record (rank 0, _dataset_record)
        if cfg.softmax.mode == "knn":
            self.graphs = GraphRefresher(world, cfg.knn, cfg.softmax.k, self.run_dir,
                                         self.reader.num_classes, cfg.seed,
                                         cfg.train.keep_checkpoints, log)

    # -- run directory and resume (collective) ------------------------------------------------------
    def open_run_dir(self) -> None:
        """Collective, first after construction: rank 0 locks the run directory for the whole
        run (`RunLock`; a second job on it is refused, whatever its flags), refuses one that
        holds a run without --resume, and drops a log line torn by a kill. Every rank follows
        rank 0's decision: a refusal is the same SetupError on every rank before any other
        collective."""
        def decide() -> None:
            self.lock = RunLock(self.run_dir)
            try:
                check_run_dir(self.run_dir, self.resume)
                repair_logs(self.run_dir, self.log)
            except ValueError:
                self.release()
                raise
        decide_on_root(self.world, decide)

    def release(self) -> None:
        """Unlock the run directory (rank 0; a no-op elsewhere and when not locked)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def restore(self, choose=checkpoint.latest_checkpoint) -> None:
        """`--resume` (`_resume`), else, or when out_dir has no checkpoint yet, `--init-from`
        (app/training/init_from.py). Collective."""
        if self.resume:
            self._resume(choose)
        if self.resumed_from is not None:  # --resume wins over --init-from: the run goes on
            self.started_from = decide_on_root(self.world,
                                               lambda: init_from.read_record(self.run_dir))
        elif self.init_source is not None:
            self.started_from = init_from.start(self, self.init_source)
        else:
            init_from.check_unused(self.cfg)  # --resume found nothing: a fresh run

    def _resume(self, choose) -> None:
        """With `--resume`: continue from the newest complete checkpoint. Rank 0 chooses it
        (`choose(run_dir)`, a listing of its view of the file system) and every rank loads that
        one, so ranks that see the directory differently cannot resume from different steps.
        A problem on any rank raises the same SetupError on every rank."""
        directory = decide_on_root(self.world, lambda: choose(self.run_dir))
        if directory is None:
            self.log.info("--resume: no complete checkpoint in %s, starting from step 0",
                          self.run_dir)
            return
        manifest, state = agree(self.world, lambda: self._load(directory))
        if self.graphs is not None and not self.graphs.load_state_dict(state.get("knn"),
                                                                        self.classifier):
            self.log.warning("the KNN graph of %s is gone; rebuilding it from the weights",
                             directory)
        if manifest["config_hash"] != config_hash(self.cfg):
            self.log.warning("resuming %s with a changed config (hash %s, was %s)", directory,
                             config_hash(self.cfg), manifest["config_hash"])
        self.resumed_from = directory
        self.log.info("resuming from %s (step %d, written by %d ranks, now %d)", directory,
                      self.start_step, manifest["world_size"], self.world.size)

    def _load(self, directory: Path) -> tuple[dict, dict]:
        """This rank's part of the checkpoint: rows, backbone, optimizer, RNG, data position."""
        manifest, state = checkpoint.restore(directory, self.reader.num_classes,
                                             self.cfg.model.embedding_dim, self.classifier)
        try:
            self.backbone.load_state_dict(state["backbone"])
            optimizers.load_state(self.optimizer, state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{directory / checkpoint.TRAINER_STATE}: the saved backbone or "
                             f"optimizer does not fit the config's model.* / optim.* ({first}); "
                             f"resume with the config the run was started with") from exc
        checkpoint.set_rng_state(state["rng"])
        self._load_sparse(directory, manifest)
        if not self.schedule.load_progress(state.get("schedule")):
            self.log.warning("%s holds no adaptive schedule state: schedule.decay=adaptive "
                             "starts afresh at this step (lr factor 1)", directory)
        position = manifest["data_position"]
        if position["global_batch_size"] != self.reader.global_batch_size:
            self.log.warning("global batch changes from %d to %d on resume: the data order "
                             "continues from the same sample of the epoch, and the loss no "
                             "longer matches an uninterrupted run", position["global_batch_size"],
                             self.reader.global_batch_size)
        self.reader.load_state_dict(position, allow_new_batch_size=True)
        self.start_step = int(manifest["step"])
        return manifest, state

    def _load_sparse(self, directory: Path, manifest: dict) -> None:
        """This rank's sparse-gradient residuals: its own, or on another world size the sum of
        those of the old ranks r' = rank mod P (the total unsent gradient is kept)."""
        world = self.world
        if self.sparse is None:
            if "rank_states" in manifest:
                self.log.warning("%s holds sparse-gradient residuals; comm.gradients=dense "
                                 "drops them (their gradient is never applied)", directory)
            return
        self.sparse.load_states(checkpoint.read_rank_states(directory, manifest, world.rank,
                                                            world.size))
        if "rank_states" not in manifest:
            self.log.warning("%s holds no sparse-gradient residuals (written with "
                             "comm.gradients=dense): they start at zero", directory)
        elif manifest["world_size"] != world.size:
            self.log.warning("sparse-gradient residuals of %d ranks regrouped onto %d (each "
                             "rank sums those of the old ranks rank mod %d): the unsent total "
                             "is kept, the selection no longer matches an uninterrupted run",
                             manifest["world_size"], world.size, world.size)

    # -- the loop (collective) ------------------------------------------------------------------
    def run(self, stop: StopRequest | None = None) -> dict:
        """Trains to `train.steps`, or until `stop` (installed by the caller before set-up; by
        this call when None) is agreed after a step."""
        world, cfg = self.world, self.cfg
        own_stop = stop is None
        stop = StopRequest() if own_stop else stop
        metrics, evals, window = self._start()
        bar = progress_bar(world, cfg.train.steps, self.start_step, f"train {cfg.softmax.mode}")
        started, loss_value, last_eval, stopped_at = time.perf_counter(), float("nan"), None, None
        skipped = 0  # non-finite steps in a row (train.on_nonfinite=skip)
        for step in range(self.start_step, cfg.train.steps):
            if self.schedule.stop_step is not None:  # schedule.adaptive_stop (or resumed so)
                break
            if step == cfg.train.crash_at_step:
                raise RuntimeError(f"train.crash_at_step={step}: injected failure")
            if self.graphs is not None:
                # Step boundary: swap in a refresh whose lag is over, start a due one.
                self.graphs.at_boundary(step, self.classifier)
                built_s, wait_s = self.graphs.take_times()
                window.knn_build_s += built_s
                window.graph_wait_s += wait_s
            t0 = time.perf_counter()
            lr = self.schedule(step)
            value, rows, hvd_wait = self._step(step, lr)
            # The loss is the global-batch mean, identical on every rank by construction, so
            # every rank stops or skips at the same step without another collective.
            if math.isfinite(value):
                skipped, loss_value = 0, value
                window.add(time.perf_counter() - t0, value, rows, hvd_wait)
                self._adapt(step, value, metrics)
            else:
                skipped += 1
                self._nonfinite(step + 1, value, lr, skipped, metrics, bar)
            bar.update(1)
            last_eval, stopped = self._after_step(step + 1, lr, window, metrics, evals, bar,
                                                  stop, last_eval)
            if stopped:
                stopped_at = step + 1
                break
        if own_stop:
            stop.restore()
        bar.close()
        return self._finish(stopped_at, stop.name, loss_value, last_eval, evals,
                            time.perf_counter() - started)

    def _start(self) -> tuple[JsonLines, JsonLines, MetricsWindow]:
        """Same initial backbone on every rank, the run directory, the classifier's initial
        rows (imprinted or not) and the first KNN graph; returns the logs and a fresh window."""
        world = self.world
        data_parallel.broadcast_initial_state(world, self.backbone)
        if world.is_root:
            prepare_run_dir(self.run_dir, None if self.resumed_from else config_to_yaml(self.cfg),
                            self.start_step)
            if self.started_from is not None and self.resumed_from is None:
                init_from.write_record(self.run_dir, self.started_from)
        world.barrier()
        self.log.info(self.plan.describe())
        warning = mpirun_sigterm_warning()
        if warning and world.is_root:
            self.log.warning(warning)
        window = MetricsWindow(self.pipeline.record() if self.pipeline is not None else None)
        window.knn_build_s += self._initial_rows_and_graph()
        if self.cfg.train.checkpoint_at_start and self.resumed_from is None:
            self._save(0)
        world.traffic.reset()
        return (JsonLines(self.run_dir / "metrics.jsonl", world.is_root),
                JsonLines(self.run_dir / "eval.jsonl", world.is_root), window)

    def _initial_rows_and_graph(self) -> float:
        """Imprint the rows at step 0 (`model.classifier_init`) and build the graph the first
        knn step needs (from the centres, the imprinted rows, random, or, when a resumed run
        lost its graph file, the weights). Returns the seconds the graph took."""
        cfg = self.cfg
        fresh = self.resumed_from is None
        if fresh and self.started_from is not None:
            return init_from.new_rows_and_graph(self)
        imprinted = starts_imprinted(cfg)
        centres = None
        if fresh and (imprinted or (self.graphs is not None and cfg.knn.init == "centres")):
            centres = train_centres(self.world, cfg, self.backbone, self.classifier, self.dtype)
        if fresh and imprinted:
            imprint(self.classifier, centres)
        if self.graphs is None or self.classifier.graph is not None:
            return 0.0
        if not fresh:  # resumed, but the graph file was lost
            rows, why = self.classifier.weight_cD, "rebuilt"
        elif cfg.knn.init == "random":
            rows, why = None, "initial"
        elif imprinted:  # the weights are the centres
            rows, why = self.classifier.weight_cD, "initial from the imprinted weights"
        else:
            rows, why = centres, "initial"
        return self.graphs.build(self.start_step, self.classifier, rows, why)

    def _nonfinite(self, done: int, value: float, lr: float, skipped: int, metrics: JsonLines,
                   bar) -> None:
        """Step `done` (counted from 1, as in metrics.jsonl) had the non-finite loss `value` and
        changed nothing (`_step`). NonFiniteLoss on every rank under train.on_nonfinite=stop or
        at the MAX_CONSECUTIVE_SKIPS-th skip in a row; otherwise the skip is logged."""
        inspect = f"python -m data_prep.inspect {self.cfg.data.path}"
        if self.cfg.train.on_nonfinite == "stop" or skipped >= MAX_CONSECUTIVE_SKIPS:
            self.reader.close()  # stops the read-ahead threads
            self.val_reader.close()
            bar.close()  # ends the progress line, so the error line stands on its own
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteLoss(
                    f"non-finite loss ({value}) at step {done}, no weights changed and no "
                    f"checkpoint written (train.on_nonfinite=stop); lower optim.lr, check the "
                    f"data with {inspect}, or set train.on_nonfinite=skip")
            raise NonFiniteLoss(
                f"non-finite loss ({value}) at step {done}, the {skipped}th step in a row "
                f"(train.on_nonfinite=skip stops at {MAX_CONSECUTIVE_SKIPS}); the run has "
                f"diverged or the data is bad: lower optim.lr or check the data with {inspect}")
        metrics.write({"step": done, "epoch": self.reader.epoch, "lr": lr,
                       "nonfinite_skipped": True, "nonfinite_loss": str(value),
                       "consecutive_skipped": skipped})
        if self.world.is_root:
            self.log.warning("non-finite loss (%s) at step %d: skipped, no weights changed "
                             "(train.on_nonfinite=skip; %d in a row, the run stops at %d)",
                             value, done, skipped, MAX_CONSECUTIVE_SKIPS)

    def _adapt(self, step: int, value: float, metrics: JsonLines) -> None:
        """schedule.decay=adaptive: feed the finite loss of step `step`; a decision (cut, floor,
        stop) goes to metrics.jsonl and the rank-0 log. The loss is the global-batch mean,
        identical on every rank, so every rank decides the same without a collective."""
        record = self.schedule.observe(step, value)
        if record is None:
            return
        metrics.write({"step": step + 1, "epoch": self.reader.epoch, **record})
        if self.world.is_root:
            self.log.info(self.schedule.adaptive.describe(step + 1, record))

    def _step(self, step: int, lr: float) -> tuple[float, int, float]:
        """One optimizer step: (global mean loss, classifier rows updated, Horovod wait s).

        A non-finite loss (the same on every rank) returns before backward: no weight,
        momentum or classifier row changed, and the batch-norm running statistics the forward
        pass moved are put back, so the step changed nothing (train.on_nonfinite decides what
        follows). (CPU: .item() costs no device synchronisation.)"""
        batch = next(self.reader)
        x_b = as_input(batch.inputs, self.dtype)
        if x_b.dtype == torch.uint8 and self.cfg.data.augment:
            # Seeded by (seed, step, rank): a resumed run augments exactly as the original.
            gen = torch.Generator().manual_seed(int(np.random.default_rng(
                [self.cfg.seed, step, self.world.rank, 7]).integers(2**62)))
            x_b = augment_images(x_b, gen)
        labels_b = torch.from_numpy(batch.labels)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none
        # The forward pass moves the batch-norm running statistics: kept to put them back.
        buffers = [b.clone() for b in self.backbone.buffers()]
        frozen = step < self.cfg.train.freeze_backbone_steps
        feat_bD = (self._frozen_features(x_b) if frozen
                   else backbone_features(self.backbone, x_b, self.cfg.train.precision))
        if self.pipeline is not None:  # comm.overlap: forward and backward of the classifier
            loss_value, feat_grad_bD = self.pipeline.loss(feat_bD, labels_b, step)
        else:
            loss, loss_value = self.classifier.loss(feat_bD, labels_b, step)
        value = loss_value.item()
        if not math.isfinite(value):
            self.classifier.discard()
            with torch.no_grad():
                for buffer, saved in zip(self.backbone.buffers(), buffers):
                    buffer.copy_(saved)
            return value, 0, 0.0
        first_free = self.started_from.num_old if self.started_from is not None else 0
        if self.pipeline is not None:
            return value, *self.pipeline.update(feat_bD, feat_grad_bD, self.optimizer, step,
                                                lr * self.classifier_lr_ratio,
                                                first_free if frozen else None)
        loss.backward()
        if frozen:  # train.freeze_backbone_steps: only the new rows learn
            return value, self.classifier.step(lr * self.classifier_lr_ratio, first_free), 0.0
        hvd_wait = data_parallel.step(self.world, self.optimizer, self.sparse, step)
        rows = self.classifier.step(lr * self.classifier_lr_ratio)
        return value, rows, hvd_wait

    @torch.no_grad()
    def _frozen_features(self, x_b: torch.Tensor) -> torch.Tensor:
        """The backbone's features in eval mode, without gradients: weights and batch-norm
        statistics stay as they are (train.freeze_backbone_steps)."""
        self.backbone.eval()
        try:
            return backbone_features(self.backbone, x_b, self.cfg.train.precision)
        finally:
            self.backbone.train()

    def _after_step(self, done: int, lr: float, window: MetricsWindow, metrics: JsonLines,
                    evals: JsonLines, bar, stop: StopRequest,
                    last_eval: dict | None) -> tuple[dict | None, bool]:
        """Metrics line, evaluation and checkpoint when due, and the agreed stop request after
        step `done`. Returns (the latest evaluation, whether to stop now)."""
        train = self.cfg.train
        last = done in (train.steps, self.schedule.stop_step)
        if (done % train.log_every == 0 or last) and window.steps:  # not if all were skipped
            record = window.flush(self.world, step=done, epoch=self.reader.epoch, lr=lr,
                                  global_batch=self.plan.global_batch)
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
        if (train.eval_every and done % train.eval_every == 0) or last:
            last_eval = self._evaluate(done, evals)
        preempted = stop.agreed(self.world)
        if (train.checkpoint_every and done % train.checkpoint_every == 0) or last or preempted:
            self._save(done)
        if preempted:
            self.log.warning("stopping at step %d on %s after a checkpoint; run again with "
                             "--resume to continue", done, stop.name)
        return last_eval, preempted

    def _finish(self, stopped_at: int | None, signal_name: str | None, loss_value: float,
                last_eval: dict | None, evals: JsonLines, wall_s: float) -> dict:
        """The run's summary (written to summary.json unless it was stopped early)."""
        self.reader.close()
        if self.graphs is not None:
            self.graphs.close()
        if stopped_at is not None:
            self.val_reader.close()
            return {"stopped_at": stopped_at, "signal": signal_name, "run_dir": str(self.run_dir)}
        # schedule.adaptive_stop may end the run before train.steps.
        steps = self.schedule.stop_step or self.cfg.train.steps
        if last_eval is None:  # resumed at the end: nothing left to train
            last_eval = self._evaluate(steps, evals)
        self.val_reader.close()
        early = {"stopped_by": "schedule.adaptive_stop"} if self.schedule.stop_step else {}
        summary = {"steps": steps, **early, "final_loss": loss_value, **last_eval,
                   "world_size": self.world.size, "global_batch": self.plan.global_batch,
                   "wall_s": wall_s, "run_dir": str(self.run_dir),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "init_from": ({"checkpoint": self.started_from.checkpoint,
                                  "step": self.started_from.step}
                                 if self.started_from is not None else None),
                   "peak_rss_mb": peak_rss_mb()}
        if self.world.is_root:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def _evaluate(self, step: int, evals: JsonLines) -> dict:
        result = evaluate(self.world, self.backbone, self.classifier, self.val_reader,
                          self.cfg.train.eval_max_samples, self.dtype)
        evals.write({"step": step, **result})
        self.log.info("eval step %d: top1 %.4f top5 %.4f over %d classes (%d samples)", step,
                      result["top1"], result["top5"], result["num_classes"],
                      result["num_samples"])
        if "top1_old" in result:
            self.log.info("eval step %d: top1 %.4f over the parent's classes, %.4f over the new "
                          "ones", step, result["top1_old"], result["top1_new"])
        return result

    def _dataset_record(self) -> dict | None:
        """Rank 0: the run's dataset as the manifest records it (data_prep.lineage.ancestor_of;
        classes.tsv is hashed once per run where dataset.json has no classes_sha256)."""
        if not self.world.is_root:
            return None
        if self._dataset is None:
            self._dataset = asdict(ancestor_of(self.cfg.data.path, self.reader.dataset_info,
                                               verify=False))
        return self._dataset

    def _save(self, step: int) -> None:
        state = {"step": step, "backbone": self.backbone.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "rng": checkpoint.rng_state(),
                 "knn": self.graphs.state_dict() if self.graphs is not None else None}
        path = checkpoint.save(self.world, self.run_dir, step, self.classifier, state,
                               self.reader.state_dict(), config_hash(self.cfg),
                               self.cfg.train.keep_checkpoints,
                               self.sparse.state_dict() if self.sparse is not None else None,
                               self._dataset_record())
        self.log.info("checkpoint %s", path)

