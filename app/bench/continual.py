"""`python -m app.bench continual`: how fast a model trained on one catalogue version converges on
the next one, the paper's continuous convergence.

Catalogue v1 (`--classes` synthetic classes) is trained for `--v1-steps` with the config's
standard schedule (warm-up, cosine to zero: a plateau at its end). v2 is v1 plus `--new-fraction`
new classes with their samples (`data_prep.synthetic --grow-from`: same ids, keys and samples
for v1's classes). On v2, each case is one `app.train` run under mpirun, evaluated on the whole
val split every `--eval-every` steps (top-1 over all v2 classes, and over v1's and the new
classes separately, app/evaluate.py):

  a  scratch    v2 from scratch, the standard schedule, `--steps` steps
  b  random     --init-from the v1 run, new rows random (model.new_rows=random), standard schedule
  c  centres    --init-from, new rows at their class centres, schedule.decay=adaptive (stops at
                its floor when the loss is flat, or at `--steps`)
  d  lars       as c, with LARS for the backbone at `--large-batch`x the global batch (and the
                learning rates scaled by it), at most `--steps / --large-batch` steps: the same
                samples as a

c and d start at the config's learning rates, v1's peak, times `--init-lr-scale` (default 1).

The target is `--target-fraction` (0.95) of a's final top-1 over all classes; each case reports
the first evaluated step at or above it (and its samples), and its final top-1 over old and new
classes, so forgetting of the old classes shows. Runs are kept under `--runs`; `--reuse` keeps a
run that has a summary.json instead of training it again.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from app.bench import launch
from app.bench.results import bench_command, host_load, write_result

CASES = ("a", "b", "c", "d")
LABELS = {"a": "a: v2 from scratch", "b": "b: init-from v1, random new rows",
          "c": "c: init-from v1, centre rows + adaptive",
          "d": "d: as c + LARS at {f}x batch"}


def arguments(p) -> None:
    p.add_argument("--kind", choices=("vectors", "images"), default="vectors",
                   help="synthetic vectors with the MLP (configs/demo.yaml) or synthetic images "
                        "with the ResNet (configs/images.yaml)")
    p.add_argument("--classes", type=int, default=20_000, help="classes of catalogue v1")
    p.add_argument("--new-fraction", type=float, default=0.25, help="v2 adds this share of v1")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--val-per-class", type=int, default=2,
                   help="val samples per class: the evaluation's noise (default: 2)")
    p.add_argument("--dim", type=int, default=128, help="input dimension (vectors)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--config", help="default: configs/demo.yaml (vectors), configs/images.yaml")
    p.add_argument("--batch", type=int, default=128, help="per rank (cases a-c)")
    p.add_argument("--v1-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=1500, help="steps of a and b, most of c")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--large-batch", type=int, default=4, help="global batch factor of d")
    p.add_argument("--lars-lr", type=float, default=2.0, help="backbone lr of d (LARS)")
    p.add_argument("--adaptive", nargs="*", default=["schedule.adaptive_window=50",
                   "schedule.adaptive_threshold=0.01", "schedule.min_lr_ratio=0.01",
                   "schedule.adaptive_stop=true"],
                   help="schedule overrides of c and d besides schedule.decay=adaptive")
    p.add_argument("--init-lr-scale", type=float, default=1.0,
                   help="c and d start from v1 at the config's learning rates (backbone and "
                        "classifier; d: --lars-lr) times this (default 1: v1's peak rates)")
    p.add_argument("--target-fraction", type=float, default=0.95)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--np", type=int, default=2)
    p.add_argument("--data", help="default: data/bench-continual-KIND")
    p.add_argument("--runs", help="default: runs/bench-continual-KIND")
    p.add_argument("--reuse", action="store_true", help="keep finished runs (summary.json)")
    p.add_argument("--name", help="default: continual_KIND")


def _datasets(args, root: Path) -> tuple[Path, Path]:
    """v1 and v2 under `root`, generated unless there already."""
    v1, v2 = root / "v1", root / "v2"
    if not (v1 / "dataset.json").exists():
        kind = ["--kind", "images", "--image-size", str(args.image_size)] \
            if args.kind == "images" else []
        launch.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(v1),
                    "--num-classes", str(args.classes), "--per-class", str(args.per_class),
                    "--val-per-class", str(args.val_per_class), "--dim", str(args.dim),
                    "--seed", "0", *kind,
                    "--overwrite"], check=True)
    if not (v2 / "dataset.json").exists():
        launch.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(v2), "--grow-from",
                    str(v1), "--new-classes", str(round(args.classes * args.new_fraction)),
                    "--overwrite"], check=True)
    return v1, v2


def _train(args, out: Path, data: Path, steps: int, sets: list[str],
           init_from: Path | None = None) -> dict:
    """One run of app.train (a fresh out_dir unless --reuse finds it finished); its summary with
    its wall time and eval curve."""
    if not (args.reuse and (out / "summary.json").exists()):
        if out.exists():
            shutil.rmtree(out)
        cmd = launch.mpirun(args.np, "-m", "app.train", "--config", args.config,
                            *[x for s in [f"data.path={data}", f"out_dir={out}",
                                          f"train.steps={steps}", "train.checkpoint_every=0",
                                          "train.keep_checkpoints=1", "train.eval_max_samples=0",
                                          *sets] for x in ("--set", s)],
                            *(["--init-from", str(init_from)] if init_from else []))
        started = time.perf_counter()
        proc = launch.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {out}: app.train exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        (out / "bench_wall_s").write_text(f"{time.perf_counter() - started:.1f}\n")
    summary = json.loads((out / "summary.json").read_text())
    curve = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    keep = ("step", "top1", "top1_old", "top1_new")
    return {"run": str(out), "steps": summary["steps"], "global_batch": summary["global_batch"],
            "stopped_by": summary.get("stopped_by"),
            "wall_s": float((out / "bench_wall_s").read_text()),
            "curve": [{k: e[k] for k in keep if k in e} for e in curve],
            "lr_decisions": _lr_decisions(out)}


def _lr_decisions(out: Path) -> list[dict]:
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "lr_decision", "new_lr")} for r in records
            if "lr_decision" in r]


def _case_settings(args, case: str) -> tuple[list[str], int]:
    """(overrides, steps) of a case on v2."""
    every = [f"train.eval_every={args.eval_every}", f"train.batch_size={args.batch}"]
    adaptive = ["model.new_rows=centres", "schedule.decay=adaptive", *args.adaptive]
    cfg = _config_values(args.config)
    scale = args.init_lr_scale
    classifier_lr = (cfg["optim"]["classifier_lr"] or cfg["optim"]["lr"]) * scale
    if case == "a":
        return every, args.steps
    if case == "b":
        return every + ["model.new_rows=random"], args.steps
    if case == "c":
        return every + adaptive + [f"optim.lr={cfg['optim']['lr'] * scale}",
                                   f"optim.classifier_lr={classifier_lr}"], args.steps
    f = args.large_batch
    eval_every = max(1, args.eval_every // f)
    return [f"train.eval_every={eval_every}", f"train.batch_size={args.batch * f}", *adaptive,
            "optim.name=lars", f"optim.lr={args.lars_lr * scale}",
            f"optim.classifier_lr={classifier_lr * f}",
            f"schedule.warmup_steps={max(1, cfg['schedule']['warmup_steps'] // f)}",
            f"schedule.adaptive_window={max(2, _window(args) // f)}"], max(1, args.steps // f)


def _window(args) -> int:
    sets = dict(s.split("=", 1) for s in args.adaptive)
    return int(sets.get("schedule.adaptive_window", 100))


def _config_values(path: str) -> dict:
    from app.config import load_config  # noqa: PLC0415

    cfg = load_config(path, [])
    return {"optim": {"classifier_lr": cfg.optim.classifier_lr, "lr": cfg.optim.lr},
            "schedule": {"warmup_steps": cfg.schedule.warmup_steps}}


def steps_to_target(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose top-1 over all classes is at least `target`."""
    return next((e["step"] for e in curve if e["top1"] >= target), None)


def summarise(cases: dict, target_fraction: float) -> dict:
    """Target, steps and samples to it, and final top-1s of every case (a must be there)."""
    a = cases["a"]
    target = target_fraction * a["curve"][-1]["top1"]
    table = {}
    for name, c in cases.items():
        steps = steps_to_target(c["curve"], target)
        final = c["curve"][-1]
        table[name] = {"steps_to_target": steps,
                       "samples_to_target": None if steps is None else steps * c["global_batch"],
                       "steps_ratio_to_a": None if steps is None or not
                       steps_to_target(a["curve"], target) else
                       steps / steps_to_target(a["curve"], target),
                       "final_top1": final["top1"], "final_top1_old": final.get("top1_old"),
                       "final_top1_new": final.get("top1_new"),
                       "old_top1_below_a": a["curve"][-1].get("top1_old", 0) -
                       final.get("top1_old", 0)}
    return {"target_top1": target, "table": table}


def run(args) -> int:
    args.config = args.config or ("configs/images.yaml" if args.kind == "images"
                                  else "configs/demo.yaml")
    data = Path(args.data or f"data/bench-continual-{args.kind}")
    runs = Path(args.runs or f"runs/bench-continual-{args.kind}")
    v1, v2 = _datasets(args, data)
    base = _train(args, runs / "v1", v1, args.v1_steps,
                  [f"train.batch_size={args.batch}", f"train.eval_every={args.eval_every}"])
    print(f"v1: top-1 {base['curve'][-1]['top1']:.4f} after {base['steps']} steps", flush=True)
    cases = {}
    for case in ["a"] + [c for c in args.cases if c != "a"]:
        sets, steps = _case_settings(args, case)
        cases[case] = _train(args, runs / case, v2, steps, sets,
                             None if case == "a" else runs / "v1")
        last = cases[case]["curve"][-1]
        print(f"{case}: top-1 {last['top1']:.4f} (old {last.get('top1_old', 0):.4f}, new "
              f"{last.get('top1_new', 0):.4f}) after {cases[case]['steps']} steps", flush=True)
    result = {"kind": args.kind, "classes_v1": args.classes,
              "classes_v2": args.classes + round(args.classes * args.new_fraction),
              "ranks": args.np, "config": args.config, "large_batch": args.large_batch,
              "init_lr_scale": args.init_lr_scale,
              "v1": base, "cases": cases, **summarise(cases, args.target_fraction),
              "host": host_load()}
    for name, row in result["table"].items():
        print(f"{name}: steps to target {row['steps_to_target']} "
              f"(x{row['steps_ratio_to_a'] or float('nan'):.2f} of a), final old-class top-1 "
              f"{row['final_top1_old']:.4f}", flush=True)
    write_result(args.results, args.name or f"continual_{args.kind}", bench_command(args.argv),
                 result, plot)
    return 0


def plot(plt, result):
    """Top-1 over all, old and new classes against samples seen, one line per case."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, key, title in zip(axes, ("top1", "top1_old", "top1_new"),
                              ("all v2 classes", "v1's classes (old)", "new classes")):
        for name, case in result["cases"].items():
            xs = [e["step"] * case["global_batch"] for e in case["curve"]]
            label = LABELS[name].format(f=result["large_batch"])
            ax.plot(xs, [e.get(key, float("nan")) for e in case["curve"]], marker=".",
                    label=label)
        if key == "top1":
            ax.axhline(result["target_top1"], color="grey", ls="--", lw=1, label="target")
        ax.set_title(title)
        ax.set_xlabel("training samples seen on v2")
    axes[0].set_ylabel("top-1 (val)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"continuous convergence: {result['classes_v1']} -> {result['classes_v2']} "
                 f"classes ({result['kind']}), {result['ranks']} ranks")
    return fig
