"""Runs Triton kernels under Triton's CPU interpreter in a fresh Python process, for the CPU test suite.

TRITON_INTERPRET must be set before the kernels are defined, hence the subprocess. PRELUDE shims two bugs of
Triton 3.6's interpreter (not the GPU path): it turns loop bounds into Python ints with int() on 1-element
arrays, which NumPy >= 2.3 rejects (read the single element instead), and its tl.dot multiplies bf16 operands'
raw uint16 bits (widen them to fp32 first, as the tensor cores do).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]


PRELUDE = r"""
import triton.language as tl
import triton.runtime.interpreter as interp
_patch = interp._patch_lang_tensor
def _patch_with_index(tensor, scope):
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patch_with_index
_dot = interp.InterpreterBuilder.create_dot
def _widen(t):
    if t.dtype.scalar != tl.bfloat16:
        return t
    data = interp._convert_float(t.data, tl.bfloat16, tl.float32, None).view("float32")
    return interp.TensorHandle(data, tl.float32)
interp.InterpreterBuilder.create_dot = lambda self, a, b, *rest: _dot(self, _widen(a), _widen(b), *rest)
"""


def run_interpreted(script: str, cases: Any, timeout_s: float = 120) -> Any:
    """Runs PRELUDE + script with sys.argv[1] = json.dumps(cases) under TRITON_INTERPRET=1; the script prints
    one JSON value as its last line of output, which is returned. Fails with the script's stderr."""
    # The kernels come from the installed package. The script may import the tests' helpers (`tests.kernels...`),
    # so the checkout goes on sys.path, last: installed packages keep precedence over its folders.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    reach_tests = f"import sys\nsys.path.append({str(CHECKOUT)!r})\n"
    proc = subprocess.run([sys.executable, "-c", reach_tests + PRELUDE + script, json.dumps(cases)], env=env,
                          cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
