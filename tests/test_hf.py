"""Runs the Hugging Face cases (tests/hf_cases.py) in their own interpreter.

Why a subprocess: with transformers 5.23 imported into the pytest process, later calls of
some fusedformer custom ops failed with std::bad_alloc / length_error raised inside torch's
op-call path (torch 2.13 CPU; seen in the full suite, not reproduced in a plain script).
The root cause is not found yet (an open bug in the notes); isolating transformers keeps the
rest of the suite honest meanwhile.
"""
import importlib.util
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_hugging_face_cases():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(HERE / "hf_cases.py")], capture_output=True, text=True, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
