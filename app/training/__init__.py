"""The training loop and what it needs around the model.

- `trainer`: `Trainer`, one run in `out_dir`: set-up (no communication), `open_run_dir()`
  (collective: rank 0 locks and checks `out_dir`), `restore()` from a checkpoint (collective),
  `run()` (the loop: step, after-step, finish), `release()` (unlock);
- `plan`: `RunPlan`, the numbers derived once from config, dataset and world;
- `run_dir`: the run directory (`RunLock`, refusing a used one, dropping a torn log line and
  trimming the logs on resume);
- `stop`: `StopRequest`, SIGUSR1/SIGTERM agreed over the ranks at step boundaries;
- `metrics`: `MetricsWindow`, per-step figures folded into one metrics line per interval;
- `data_parallel`: Horovod in one place (the backbone's DistributedOptimizer, broadcast);
- `optimizers`: the backbone's optimizers (sgd, adamw, our LARS and LAMB) and resuming them;
- `schedule`: `LRSchedule`, the learning rate as a function of the step (and, under
  `schedule.decay=adaptive`, of the losses so far: `adaptive.AdaptiveDecay`).
"""
