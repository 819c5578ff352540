"""The README's example runs as written (torchrun, 2 ranks, gloo) and prints what it checked: the
largest difference between the ring's output and single-device attention."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    """The first python block of README.md."""
    match = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert match, "README.md has no python block"
    return match.group(1)


def test_readme_example_runs_and_reports_its_check(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(readme_example())
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reported = re.findall(r"2 ranks, max \|out - single-device attention\| = (\S+)", done.stdout)
    assert len(reported) == 1, done.stdout  # printed once, by rank 0
    assert float(reported[0]) < 1e-5
