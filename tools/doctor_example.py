"""Prints the doctor's output for the tiny Qwen v1 model on the installed packages, as Markdown (docs/doctor.md).

    python tools/doctor_example.py          # the text report
    python tools/doctor_example.py --json   # the JSON report

The model is written to a temporary directory named ``tiny-qwen``; the temporary part of the paths is left out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    as_json = "--json" in sys.argv[1:]
    from qwen_ckpt_compat.testing import write_tiny_qwen

    with tempfile.TemporaryDirectory(prefix="qcc-doctor-example-") as tmp:
        write_tiny_qwen(Path(tmp) / "tiny-qwen")
        command = [sys.executable, "-m", "qwen_ckpt_compat", "doctor", "tiny-qwen", *(["--json"] if as_json else [])]
        environment = dict(os.environ, HF_HUB_OFFLINE="1")
        environment.pop("NO_COLOR", None)
        result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, env=environment, check=False)
        output = result.stdout.replace(str(Path(tmp).resolve()) + os.sep, "").replace(tmp + os.sep, "")
    print("```json" if as_json else "```text")
    if not as_json:
        print("$ qwen-ckpt-compat doctor tiny-qwen")
    print(output.rstrip())
    if not as_json:
        print(f"$ echo $?\n{result.returncode}")
    print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
