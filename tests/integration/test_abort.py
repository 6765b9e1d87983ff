"""An uncaught exception on one rank ends the whole job promptly, with its rank in the output."""
import time

from tests.integration.launch import mpirun_cmd, run


def test_exception_on_one_rank_aborts_three_rank_job():
    start = time.monotonic()
    proc = run(mpirun_cmd(3, "-m", "tests.integration._crash_job"), timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f}s to end"
    assert "[rank 1]" in proc.stderr and "deliberate failure on rank 1" in proc.stderr
    assert "unreachable" not in proc.stdout
