"""Distributed evaluation: top-1 and top-5 over ALL C classes on the val split.

`python -m app.evaluate --run DIR` evaluates the newest checkpoint of a run (under mpirun with
any number of ranks) and appends to the run's eval.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from app.classifier.topk import global_topk
from app.model import as_input


@torch.no_grad()
def evaluate(world, backbone, classifier, reader, max_samples: int = 0, dtype=torch.float32) -> dict:
    """Each rank embeds its part of the val split; `global_topk` scores every feature against
    every class (each rank its rows, candidates merged). Returns global counts and accuracies,
    identical on all ranks.

    On a dataset grown from an earlier version (dataset.json's `lineage`), top-1 is also split by
    the sample's class: `top1_old` over the classes of the parent version (ids below its class
    count), `top1_new` over the classes added since, with `num_samples_old` / `num_samples_new`;
    forgetting of the old classes shows there, not in the mean."""
    from mpi import collectives  # noqa: PLC0415

    was_training = backbone.training
    backbone.eval()
    lineage = reader.dataset_info.lineage
    old_classes = lineage[0].num_classes if lineage else 0
    counts = torch.zeros(5, dtype=torch.int64)  # top-1, top-5, seen, top-1 old, seen old
    for batch in reader.one_epoch():
        feat_bD = backbone(as_input(batch.inputs, dtype))
        _, ids_bk = global_topk(world, classifier, feat_bD.to(classifier.weight_cD.dtype), 5)
        labels_b = torch.from_numpy(batch.labels)
        if ids_bk.shape[0]:
            hit1_b = ids_bk[:, 0] == labels_b
            old_b = labels_b < old_classes
            counts += torch.stack([hit1_b.sum(), (ids_bk == labels_b.unsqueeze(1)).any(dim=1).sum(),
                                   torch.tensor(labels_b.shape[0]), (hit1_b & old_b).sum(),
                                   old_b.sum()])
        # Every rank takes part in every batch's collectives, so the stop decision is global.
        if max_samples and int(collectives.allreduce(world, counts[2:3].clone())[0]) >= max_samples:
            break
    backbone.train(was_training)
    c1, c5, n, c1_old, n_old = (int(v) for v in collectives.allreduce(world, counts))
    result = {"top1": c1 / max(n, 1), "top5": c5 / max(n, 1), "num_samples": n,
              "num_classes": classifier.num_classes}
    if old_classes:
        result.update(top1_old=c1_old / max(n_old, 1), top1_new=(c1 - c1_old) / max(n - n_old, 1),
                      num_samples_old=n_old, num_samples_new=n - n_old)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.evaluate", description=(
        "Evaluate a run's newest (or a given) checkpoint on the val split: top-1 and top-5 over "
        "all classes. Works under mpirun/srun with any number of ranks. Exit codes: 0 done, "
        "2 bad run directory, config, checkpoint or val split, e.g. a non-finite input value "
        "(one error line naming the file)."))
    p.add_argument("--run", required=True, help="run directory (holds config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: the newest complete one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the run, e.g. data.path=... (repeatable)")
    p.add_argument("--max-samples", type=int, default=0, help="cap on val samples (0 = all)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from app import checkpoint  # noqa: PLC0415 - after argument parsing, keeps --help fast
    from data_prep.format import DatasetError  # noqa: PLC0415
    from mpi.agree import (SetupError, abort_on_input_error, agree,  # noqa: PLC0415
                           decide_on_root, exit_on_setup_error)
    from mpi.world import init_world  # noqa: PLC0415

    world = init_world()
    run_dir = Path(args.run)
    try:
        # Rank 0 chooses the checkpoint; every rank then loads its part of that one.
        directory = decide_on_root(world, lambda: checkpoint.find_checkpoint(run_dir,
                                                                            args.checkpoint))
        state = agree(world, lambda: _load_for_eval(world, run_dir, directory, args.set))
    except SetupError as exc:
        code = exit_on_setup_error(world, exc)
        world.shutdown()
        return code
    backbone, classifier, reader, step, dtype = state
    try:
        result = evaluate(world, backbone, classifier, reader, args.max_samples, dtype)
    except DatasetError as exc:  # a damaged val row read by this rank alone (a small val split
        abort_on_input_error(world, exc)  # is checked at start, a set-up error above): exit 2
    reader.close()
    if world.is_root:
        record = {"step": step, **result, "source": "app.evaluate"}
        with (run_dir / "eval.jsonl").open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        print(f"step {step}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} over "
              f"{result['num_classes']} classes ({result['num_samples']} samples)", flush=True)
    world.shutdown()
    return 0


def _load_for_eval(world, run_dir: Path, directory: Path, overrides: list[str]):
    """Config, model and val reader of a run, restored from a checkpoint (no communication)."""
    from app import checkpoint  # noqa: PLC0415
    from app.config import load_config  # noqa: PLC0415
    from app.model import build_model  # noqa: PLC0415
    from data_prep.reader import ShardedReader  # noqa: PLC0415

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: not found; --run must name a run directory")
    cfg = load_config(str(config_path), overrides)
    reader = ShardedReader(cfg.data.path, "val", world.rank, world.size,
                           cfg.train.eval_batch_size, cfg.seed, shuffle=False, drop_last=False,
                           prefetch=cfg.data.prefetch)
    backbone, classifier, dtype = build_model(world, cfg, reader.input_shape, reader.num_classes)
    manifest, state = checkpoint.restore(directory, reader.num_classes, cfg.model.embedding_dim,
                                         classifier)
    backbone.load_state_dict(state["backbone"])
    return backbone, classifier, reader, int(manifest["step"]), dtype


if __name__ == "__main__":
    sys.exit(main())
