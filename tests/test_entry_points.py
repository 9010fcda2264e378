"""The stage scripts start the same way as files (`accelerate launch mpp/pretrain.py`) and as modules
(`accelerate launch -m mpp.pretrain`)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from conftest import REPO

STAGES = ["pretrain", "linprobe", "knn", "finetune"]
PATH_SETUP = 'if __name__ == "__main__" and not __package__:'


def test_pretrain_runs_as_a_file_and_as_a_module(tmp_path):
    """Both print the script's usage (its docstring): the file from any folder, the module from the repository."""
    doc = importlib.import_module("mpp.pretrain").__doc__
    as_file = subprocess.run([sys.executable, str(REPO / "mpp" / "pretrain.py"), "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    as_module = subprocess.run([sys.executable, "-m", "mpp.pretrain", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    for result in (as_file, as_module):
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == doc + "\n"


def test_a_script_run_as_a_file_imports_mpp_from_the_repository_root():
    """Python puts the script's folder, mpp/, first on the path; mpp/_repo_root.py puts the repository root there."""
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'mpp'); import _repo_root; "
                             "print(sys.path[0]); import mpp; print(mpp.__file__)"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(REPO), str(REPO / "mpp" / "__init__.py")]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_script_sets_the_path_up_before_it_imports_mpp(stage):
    """What lets the pretraining script run as a file holds for each stage script: mpp/_repo_root.py first."""
    source = (REPO / "mpp" / f"{stage}.py").read_text()
    assert source.index(PATH_SETUP + "  ") < source.index("import _repo_root") < source.index("from mpp")
