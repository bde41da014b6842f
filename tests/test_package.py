"""The installed package: version, typed marker, data, console scripts.

Builds a wheel of this checkout, installs it (without dependencies) into a
new venv that borrows this one's dependencies, and runs each console
script's ``--help`` from outside the repository.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("maml-tf-sinusoid", "maml-tf-classification", "maml-tf-rl",
           "maml-tf-rl-compare")


@pytest.mark.slow
def test_wheel_installs_version_data_and_console_scripts(tmp_path):
  # A copy of the sources (the build leaves nothing in the checkout), a
  # wheel of it, and a new venv that sees this one's dependencies but not
  # its editable maml_tf: pip installs there, never into this venv.
  src = tmp_path / "src"
  shutil.copytree(os.path.join(REPO, "maml_tf"), src / "maml_tf",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("setup.py", "README.md", "LICENSE"):
    shutil.copy(os.path.join(REPO, name), src / name)
  pip = [sys.executable, "-m", "pip", "-q"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation",
                        str(src), "-w", str(tmp_path / "wheel")], check=True)
  wheel = glob.glob(str(tmp_path / "wheel" / "maml_tf-*.whl"))[0]
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                 check=True)
  site = glob.glob(str(venv / "lib" / "python*" / "site-packages"))[0]
  with open(os.path.join(site, "dependencies.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  python = str(venv / "bin" / "python")
  subprocess.run(pip + ["--python", python, "install", "--no-deps", wheel],
                 check=True)
  prefix = venv
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("PYTHONPATH", None)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  probe = subprocess.run(
      [python, "-c",
       "import maml_tf, os; from maml_tf.models import pretrained; "
       "print(maml_tf.__version__, maml_tf.__file__, "
       "os.path.exists(os.path.join(os.path.dirname(maml_tf.__file__), "
       "'py.typed')), pretrained.available())"],
      cwd=outside, env=env, capture_output=True, text=True, check=True)
  version, path, typed, names = probe.stdout.split(" ", 3)
  import maml_tf  # pylint: disable=g-import-not-at-top
  assert version == maml_tf.__version__
  assert path.startswith(site)                       # the installed copy
  assert typed == "True" and "omniglot_5w1s" in names and "sinusoid" in names
  for script in SCRIPTS:
    out = subprocess.run([str(prefix / "bin" / script), "--helpshort"],
                         cwd=outside, env=env, capture_output=True, text=True)
    assert "--" in out.stdout and "Traceback" not in out.stderr, (
        script, out.stdout[-500:], out.stderr[-2000:])
