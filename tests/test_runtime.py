"""OpenMP settings for shared CPUs: set before torch loads, the user's own values win."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pointclora.runtime import SWITCH, free_cpus

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").glob("*.py"))

# Runs a tool up to its first import of torch and prints OMP_WAIT_POLICY at that moment.
SPY = """
import os, runpy, sys
class TorchImported(Exception):
    pass
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise TorchImported(os.environ.get("OMP_WAIT_POLICY"))
        return None
sys.meta_path.insert(0, Spy())
sys.argv = [{tool!r}, "--help"]
try:
    runpy.run_path({tool!r}, run_name="__main__")
    print("AT_TORCH_IMPORT never")
except TorchImported as seen:
    print("AT_TORCH_IMPORT", seen.args[0])
"""


def _env(**set_vars):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", SWITCH)}
    env.update(set_vars)
    return env


def _python(code: str, **set_vars) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(**set_vars), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


def test_package_import_sets_passive_wait_policy_and_user_value_wins():
    code = "import os, pointclora; print('POLICY', os.environ.get('OMP_WAIT_POLICY'))"
    assert "POLICY PASSIVE" in _python(code)
    assert "POLICY ACTIVE" in _python(code, OMP_WAIT_POLICY="ACTIVE")
    assert "POLICY None" in _python(code, **{SWITCH: "0"})


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: p.name)
def test_every_tool_sets_the_policy_before_torch_loads(tool):
    out = _python(SPY.format(tool=str(tool)))
    assert "AT_TORCH_IMPORT PASSIVE" in out, out[-2000:]
    out = _python(SPY.format(tool=str(tool)), OMP_WAIT_POLICY="active")
    assert "AT_TORCH_IMPORT active" in out, out[-2000:]


def test_free_cpus_subtracts_the_load():
    assert free_cpus(2, 0.0) == 2
    assert free_cpus(2, 1.2) == 1
    assert free_cpus(8, 2.6) == 5
    assert free_cpus(2, 7.0) == 1  # never fewer than one thread
    assert free_cpus(4, -1.0) == 4


def test_torch_imported_first_fits_threads_to_the_load_with_a_warning():
    code = """
import os, warnings
os.getloadavg = lambda: (3.2, 3.0, 3.0)
os.sched_getaffinity = lambda pid: {0, 1, 2, 3}
import torch
torch.set_num_threads(4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pointclora
print("THREADS", torch.get_num_threads(), "POLICY", os.environ.get("OMP_WAIT_POLICY"))
print("WARN", [str(w.message) for w in caught if "imported before pointclora" in str(w.message)])
"""
    out = _python(code)
    assert "THREADS 1 POLICY None" in out  # 4 CPUs, 3 busy; too late to set the policy
    assert "WARN ['torch was imported before pointclora" in out
    out = _python(code, OMP_WAIT_POLICY="PASSIVE")  # the user chose: leave threads alone
    assert "THREADS 4 POLICY PASSIVE" in out
