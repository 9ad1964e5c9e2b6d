"""Every ```python block of README.md runs as written, each in its own process outside pytest's
(the Hugging Face snippet imports transformers; see tests/test_hf.py for why that stays out of
the pytest process).

One interpreter imports torch and fusedformer, which every snippet imports first (their import
was 2.5-4.5 s of each snippet's 3.4-6 s on the 2-core dev machine), and then forks one child per
snippet. A child runs its snippet in fresh globals, so a snippet that leaves out an import still
fails, and it starts from the module state that the snippet's own first lines would create.
Nothing runs threads or kernels before the fork: importing fusedformer runs nothing.
"""
import json
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

# argv: the snippets' JSON file, the results' JSON file. A snippet's stdout and stderr go to the
# runner's; its traceback (if any) comes back through a pipe, with its exit status.
RUNNER = r"""
import json, os, sys, traceback
import torch, fusedformer

blocks = json.loads(open(sys.argv[1]).read())
results = []
for code in blocks:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        status = 0
        try:
            exec(compile(code, "<README snippet>", "exec"), {"__name__": "__main__"})
        except BaseException:
            os.write(write_end, traceback.format_exc()[-3000:].encode())
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    os.close(write_end)
    error = b""
    while chunk := os.read(read_end, 65536):
        error += chunk
    os.close(read_end)
    _, wait_status = os.waitpid(pid, 0)
    results.append({"exit": os.waitstatus_to_exitcode(wait_status), "error": error.decode(errors="replace")})
open(sys.argv[2], "w").write(json.dumps(results))
"""


@pytest.fixture(scope="module")
def snippet_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "blocks.json").write_text(json.dumps(BLOCKS))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp / "blocks.json"), str(tmp / "results.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the snippet runner failed:\n{proc.stderr[-3000:]}"
    return json.loads((tmp / "results.json").read_text())


def test_readme_has_snippets():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(snippet_results, index):
    result = snippet_results[index]
    assert result["exit"] == 0, f"{BLOCKS[index]}\n--- exit {result['exit']} ---\n{result['error']}"
