"""scripts/gpu_check.sh end to end on the CPU (DEVICE=cpu, small sizes), with Horovod, faiss,
mpi4py, yaml, omegaconf, matplotlib and pytest impossible to import (a sitecustomize on
PYTHONPATH), as on a bare GPU node with only torch, numpy and h5py: the checks pass and
`python -m app.bench gpu` writes its result, labelled as a CPU run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("horovod", "faiss", "mpi4py", "yaml", "omegaconf", "matplotlib", "pytest")
SITECUSTOMIZE = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_gpu_check_script_runs_on_the_cpu_without_mpi_horovod_faiss(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable,
               PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT,
                          env=env, timeout=400, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert "pytest: not installed" in (out / "env.txt").read_text()  # the block held
    checks = json.loads((out / "gpu_checks.json").read_text())
    assert checks["device"] == "cpu" and checks["failed"] == []
    assert len(checks["checks"]["softmax"]) == 2 * 3 * 3 * 3  # precision x logit x mode x value
    assert checks["checks"]["graph"][0]["rows_with_identical_ids"] == 1.0  # cpu against cpu
    result = json.loads((out / "gpu_capacity.json").read_text())
    assert result["device"] == "cpu" and "not the one-GPU measurement" in result["note"]
    assert result["command"].startswith("python -m app.bench gpu --device cpu")
    dim, k = result["settings"]["dim"], result["settings"]["k"]
    for classes in (2000, 5000):
        for mode in ("full", "knn"):
            run = result["runs"][str(classes)][mode]
            assert run["fits"] and run["samples_per_s"] > 0 and run["peak_bytes"] > 0
        knn = result["runs"][str(classes)]["knn"]
        assert knn["held_bytes"] == knn["predicted_bytes"] == classes * (2 * 4 * dim + 4 * k)
    assert "measured_s" in result["graph_build"]["2000"]
    assert result["capacity_estimate"]["knn"]["bytes_per_class"] == 2 * 4 * dim + 4 * k
    assert not (out / "gpu_capacity.png").exists()  # no matplotlib: the JSON alone
    assert "knn samples/s" in (out / "summary.txt").read_text()
