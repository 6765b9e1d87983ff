"""The training loop (DESIGN.md section 3), modes `full` and `sampled`.

Legend: b = this rank's batch, N = global batch (P * b), D = embedding dim.

Construction does no communication, so a bad config, dataset or checkpoint is found by every rank
before any collective and the job can exit cleanly (app/train.py agrees on the outcome). `run()`
is collective from its first line.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app import checkpoint, data_parallel
from app.backbones import augment_images
from app.config import Config, config_hash, config_to_yaml
from app.evaluate import as_input, evaluate
from app.classifier.centres import imprint, starts_imprinted, train_centres
from app.knn_state import KnnGraphs
from app.model import build_model
from app.runlog import JsonLines, peak_rss_mb, progress_bar
from app.schedule import LRSchedule
from data_prep.reader import ShardedReader
from mpi import collectives
from mpi.partition import class_counts

@dataclass(frozen=True)
class RunPlan:
    """Numbers derived once from the config, the dataset and the world; logged in one line."""

    world_size: int
    mode: str
    global_batch: int
    num_classes: int
    classes_per_rank: tuple[int, int]
    rows_per_step: int          # classes scored per sample: per shard (full, sampled), or in all (knn)
    steps: int
    steps_per_epoch: int
    feature_bytes_per_step: int  # gathered features + labels sent by one rank per step

    def describe(self) -> str:
        lo, hi = self.classes_per_rank
        return (f"plan: {self.world_size} ranks, global batch {self.global_batch}, "
                f"{self.num_classes} classes ({lo}-{hi} per rank), {self.rows_per_step} scored "
                f"per sample{' per shard' if self.mode != 'knn' else ''}, {self.steps} steps = "
                f"{self.steps / self.steps_per_epoch:.2f} epochs, "
                f"~{self.feature_bytes_per_step / 2**20:.2f} MiB features out per rank per step")


def make_plan(world, cfg: Config, reader: ShardedReader) -> RunPlan:
    counts = class_counts(reader.num_classes, world.size)
    local = counts[world.rank]
    if cfg.softmax.mode == "knn":  # a sample's active classes, over all shards
        rows = min(cfg.softmax.k, reader.num_classes) + cfg.softmax.random_negatives
    elif cfg.softmax.mode == "sampled":
        rows = math.ceil(cfg.softmax.sample_rate * local)
    else:
        rows = local
    itemsize = 8 if cfg.train.dtype == "float64" else 4
    feat_bytes = cfg.train.batch_size * (cfg.model.embedding_dim * itemsize + 8) * (world.size - 1)
    return RunPlan(world.size, cfg.softmax.mode, world.size * cfg.train.batch_size, reader.num_classes,
                   (min(counts), max(counts)), rows, cfg.train.steps, reader.batches_per_epoch,
                   feat_bytes)


class Trainer:
    """One training run in `cfg.out_dir`; see the module docstring."""

    def __init__(self, world, cfg: Config, resume: bool, log):
        self.world, self.cfg, self.log = world, cfg, log
        self.run_dir = Path(cfg.out_dir)
        self.start_step = 0
        self._check_run_dir(resume)
        self.reader = ShardedReader(cfg.data.path, "train", world.rank, world.size,
                                    cfg.train.batch_size, cfg.seed, prefetch=cfg.data.prefetch)
        self.val_reader = ShardedReader(cfg.data.path, "val", world.rank, world.size,
                                        cfg.train.eval_batch_size, cfg.seed, shuffle=False,
                                        drop_last=False, prefetch=cfg.data.prefetch)
        self.plan = make_plan(world, cfg, self.reader)
        if world.device.type != "cpu":
            log.warning("this rank sees %s, but the trainer computes on the CPU in this "
                        "version (GPU placement is not implemented yet)", world.device)
        self.backbone, self.classifier, self.dtype = build_model(
            world, cfg, self.reader.input_shape, self.reader.num_classes)
        self.optimizer = data_parallel.build_backbone_optimizer(world, self.backbone, cfg.optim)
        self.schedule = LRSchedule(cfg.optim.lr, cfg.schedule, cfg.train.steps)
        self.classifier_lr_ratio = (cfg.optim.classifier_lr or cfg.optim.lr) / cfg.optim.lr
        self.graphs = None
        if cfg.softmax.mode == "knn":
            self.graphs = KnnGraphs(world, cfg.knn, cfg.softmax.k, self.run_dir,
                                    self.reader.num_classes, cfg.seed,
                                    cfg.train.keep_checkpoints, log)
        self.resumed_from = self._load_checkpoint() if resume else None

    # -- set-up (no communication) ------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        holds_run = (self.run_dir / "metrics.jsonl").exists() or \
            (self.run_dir / "checkpoints").exists()
        if holds_run and not resume:
            raise ValueError(f"{self.run_dir}: already holds a run; pass --resume to continue it "
                             f"or set out_dir to a new directory")

    def _load_checkpoint(self) -> Path | None:
        directory = checkpoint.latest_checkpoint(self.run_dir)
        if directory is None:
            self.log.info("--resume: no complete checkpoint in %s, starting from step 0",
                          self.run_dir)
            return None
        manifest, state = checkpoint.restore(directory, self.reader.num_classes,
                                             self.cfg.model.embedding_dim, self.classifier)
        try:
            self.backbone.load_state_dict(state["backbone"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"{directory / 'trainer.pt'}: the saved backbone or optimizer does "
                             f"not fit the config's model.* / optim.* ({first}); resume with the "
                             f"config the run was started with") from exc
        checkpoint.set_rng_state(state["rng"])
        position = manifest["data_position"]
        if position["global_batch_size"] != self.reader.global_batch_size:
            self.log.warning("global batch changes from %d to %d on resume: the data order "
                             "continues from the same sample of the epoch, and the loss no "
                             "longer matches an uninterrupted run", position["global_batch_size"],
                             self.reader.global_batch_size)
        self.reader.load_state_dict(position, allow_new_batch_size=True)
        self.start_step = int(manifest["step"])
        if self.graphs is not None and not self.graphs.load_state_dict(state.get("knn"),
                                                                        self.classifier):
            self.log.warning("the KNN graph of %s is gone; rebuilding it from the weights",
                             directory)
        if manifest["config_hash"] != config_hash(self.cfg):
            self.log.warning("resuming %s with a changed config (hash %s, was %s)", directory,
                             config_hash(self.cfg), manifest["config_hash"])
        self.log.info("resuming from %s (step %d, written by %d ranks, now %d)", directory,
                      self.start_step, manifest["world_size"], self.world.size)
        return directory

    def _prepare_run_dir(self) -> None:
        """Rank 0 creates the run directory; a resumed run drops metrics past its checkpoint."""
        if not self.world.is_root:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resumed_from is None:
            (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        for name in ("metrics.jsonl", "eval.jsonl"):
            path = self.run_dir / name
            if path.exists():  # lines written after the checkpoint by the run that crashed
                kept = [line for line in path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= self.start_step]
                tmp = path.with_name(name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                os.replace(tmp, path)

    # -- the loop (collective) ------------------------------------------------------------------
    def run(self) -> dict:
        world, cfg = self.world, self.cfg
        data_parallel.broadcast_initial_state(world, self.backbone)
        self._prepare_run_dir()
        world.barrier()
        self.log.info(self.plan.describe())
        metrics = JsonLines(self.run_dir / "metrics.jsonl", world.is_root)
        evals = JsonLines(self.run_dir / "eval.jsonl", world.is_root)
        grad_bytes = data_parallel.gradient_bytes(world, self.backbone)
        window = _Window()
        centres = None
        imprinted = starts_imprinted(cfg)
        if self.start_step == 0 and (imprinted or (self.graphs is not None
                                                   and cfg.knn.init == "centres")):
            centres = train_centres(world, cfg, self.backbone, self.classifier, self.dtype)
        if self.start_step == 0 and imprinted:
            imprint(self.classifier, centres)
        if self.graphs is not None and self.classifier.graph is None:
            if self.start_step > 0:  # resumed, but the graph file was lost
                rows, why = self.classifier.weight_cD, "rebuilt"
            elif cfg.knn.init == "random":
                rows, why = None, "initial"
            elif imprinted:  # the weights are the centres
                rows, why = self.classifier.weight_cD, "initial from the imprinted weights"
            else:
                rows, why = centres, "initial"
            window.knn_build_s += self.graphs.build(self.start_step, self.classifier, rows,
                                                    why)
        world.traffic.reset()
        bar = progress_bar(world, cfg.train.steps, self.start_step, f"train {cfg.softmax.mode}")
        last_eval, loss_value, stopped_at = None, float("nan"), None
        started = time.perf_counter()
        stop = _StopRequest(world)
        for step in range(self.start_step, cfg.train.steps):
            if step == cfg.train.crash_at_step:
                raise RuntimeError(f"train.crash_at_step={step}: injected failure")
            if self.graphs is not None and self.graphs.due(step):
                # Synchronous refresh at a step boundary: the next step uses the new graph.
                window.knn_build_s += self.graphs.build(step, self.classifier,
                                                        self.classifier.weight_cD, "refresh")
            t0 = time.perf_counter()
            lr = self.schedule(step)
            loss, rows, hvd_wait = self._step(step, lr)
            # The loss is the global-batch mean, identical on every rank by construction, so
            # every rank stops at the same step without another collective. (CPU: .item() costs
            # no device synchronisation.)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss {loss_value} at step {step}; lower "
                                         f"optim.lr or check the data")
            done = step + 1
            window.add(time.perf_counter() - t0, loss_value, rows, hvd_wait)
            bar.update(1)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                record = window.flush(world, step=done, epoch=self.reader.epoch, lr=lr,
                                      global_batch=self.plan.global_batch, grad_bytes=grad_bytes)
                metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}",
                                samples_s=f"{record['samples_per_s']:.0f}")
            if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == cfg.train.steps:
                last_eval = self._evaluate(done, evals)
            preempted = stop.agreed()
            if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or \
                    done == cfg.train.steps or preempted:
                self._save(done)
            if preempted:
                stopped_at = done
                self.log.warning("stopping at step %d on %s after a checkpoint; run again with "
                                 "--resume to continue", done, stop.name)
                break
        stop.restore()
        bar.close()
        if stopped_at is not None:
            self.reader.close()
            self.val_reader.close()
            return {"stopped_at": stopped_at, "signal": stop.name, "run_dir": str(self.run_dir)}
        if last_eval is None:  # resumed at the end: nothing left to train
            last_eval = self._evaluate(cfg.train.steps, evals)
        summary = {"steps": cfg.train.steps, "final_loss": loss_value, **last_eval,
                   "world_size": world.size, "global_batch": self.plan.global_batch,
                   "wall_s": time.perf_counter() - started, "run_dir": str(self.run_dir),
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "peak_rss_mb": peak_rss_mb()}
        if world.is_root:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.reader.close()
        self.val_reader.close()
        return summary

    def _step(self, step: int, lr: float) -> tuple[torch.Tensor, int, float]:
        batch = next(self.reader)
        x_b = as_input(batch.inputs, self.dtype)
        if x_b.dtype == torch.uint8 and self.cfg.data.augment:
            # Seeded by (seed, step, rank): a resumed run augments exactly as the original.
            gen = torch.Generator().manual_seed(
                int(np.random.default_rng([self.cfg.seed, step, self.world.rank, 7]).integers(2**62)))
            x_b = augment_images(x_b, gen)
        labels_b = torch.from_numpy(batch.labels)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad()  # Horovod 0.28 takes no set_to_none
        feat_bD = self.backbone(x_b)
        loss, loss_value = self.classifier.loss(feat_bD, labels_b, step)
        loss.backward()
        hvd_wait = data_parallel.step(self.world, self.optimizer)
        rows = self.classifier.step(lr * self.classifier_lr_ratio)
        return loss_value, rows, hvd_wait

    def _evaluate(self, step: int, evals: JsonLines) -> dict:
        result = evaluate(self.world, self.backbone, self.classifier, self.val_reader,
                          self.cfg.train.eval_max_samples, self.dtype)
        evals.write({"step": step, **result})
        self.log.info("eval step %d: top1 %.4f top5 %.4f over %d classes (%d samples)", step,
                      result["top1"], result["top5"], result["num_classes"],
                      result["num_samples"])
        return result

    def _save(self, step: int) -> None:
        state = {"step": step, "backbone": self.backbone.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "rng": checkpoint.rng_state(),
                 "knn": self.graphs.state_dict() if self.graphs is not None else None}
        path = checkpoint.save(self.world, self.run_dir, step, self.classifier, state,
                               self.reader.state_dict(), config_hash(self.cfg),
                               self.cfg.train.keep_checkpoints)
        self.log.info("checkpoint %s", path)


class _StopRequest:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption, scancel) on any
    rank asks every rank to stop after the current step with a checkpoint. The flag is combined
    over ranks by one scalar allreduce per step, so all ranks stop at the same step even when the
    signal reached only some of them."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, world):
        self.world, self.name = world, None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.name = signal.Signals(signum).name

    def agreed(self) -> bool:
        flag = torch.tensor([0 if self.name is None else 1], dtype=torch.int32)
        if collectives.allreduce(self.world, flag, "max")[0] == 0:
            return False
        self.name = self.name or "a signal on another rank"
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Window:
    """Per-step figures accumulated between two metrics lines (host numbers only)."""

    def __init__(self):
        self.steps, self.seconds, self.loss, self.rows, self.hvd_wait = 0, 0.0, 0.0, 0, 0.0
        self.knn_build_s = 0.0

    def add(self, seconds: float, loss: float, rows: int, hvd_wait: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.loss += loss
        self.rows += rows
        self.hvd_wait += hvd_wait

    def flush(self, world, *, step: int, epoch: int, lr: float, global_batch: int,
              grad_bytes: int) -> dict:
        n = max(self.steps, 1)
        sent, comm_s = world.traffic.reset()
        record = {
            "step": step, "epoch": epoch, "loss": self.loss / n, "lr": lr,
            "samples_per_s": global_batch * self.steps / max(self.seconds, 1e-9),
            "step_time_s": self.seconds / n, "comm_time_s": (comm_s + self.hvd_wait) / n,
            "bytes_sent": sent // n + grad_bytes, "grad_bytes_sent": grad_bytes,
            "rows_updated": self.rows // n, "peak_rss_mb": round(peak_rss_mb(), 1),
            "knn_build_s": self.knn_build_s,
        }
        self.__init__()
        return record
