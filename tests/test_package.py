"""The built wheel works installed: it carries the tuning databases, and export finds them there."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, schedules, lntune
from schedules import database
from schedules.targets import get_target
from lntune.build import kernels_for
assert "site" in database.__file__, database.__file__
target = get_target("cuda-sm90")
kernel = next(k for k in kernels_for(1024, "bfloat16", target) if k.op == "backward")
print(json.dumps({"file": database.__file__, "source": database.choose(kernel, target).source}))
"""


def test_installed_wheel_exports_tuned_kernels(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("lntune-*.whl")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=300)
    # Run from the install (not the checkout): its own copy of the code and of tuning_logs/.
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = out.stdout.strip().splitlines()[-1]
    assert str(site) in result and '"source": "baseline' not in result, result
