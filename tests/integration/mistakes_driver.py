"""Run `python -m app ARGS` for many rows in one interpreter (each python start costs seconds here).

    python tests/integration/mistakes_driver.py ROWS.json OUT.json

ROWS.json: [{"id": ..., "args": [...], "block": ["vllm", ...]}]; `block` names modules whose import must fail.
Each row runs `app/__main__.py` exactly as `python -m app` does (runpy), with its stdout and stderr captured at the
file-descriptor level; OUT.json gets {id: {"code", "stdout", "stderr"}}.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback


def run_row(args: list[str], block: list[str]) -> dict:
    saved_modules = {name: sys.modules.get(name) for name in block}
    for name in block:
        sys.modules[name] = None  # `import name` raises ImportError
    sys.argv = ["app", *args]
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    saved_fds = [os.dup(1), os.dup(2)]
    sys.stdout.flush(), sys.stderr.flush()
    os.dup2(files[0].fileno(), 1), os.dup2(files[1].fileno(), 2)
    code: int | str = 0
    try:
        runpy.run_module("app", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - what `python -m app` would print
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved_fds[0], 1), os.dup2(saved_fds[1], 2)
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    out = []
    for f in files:
        f.seek(0)
        out.append(f.read().decode(errors="replace"))
    return {"code": code, "stdout": out[0], "stderr": out[1]}


def main() -> None:
    rows_path, out_path = sys.argv[1:3]  # run_row rewrites sys.argv
    rows = json.loads(open(rows_path).read())
    results = {row["id"]: run_row(row["args"], row.get("block", [])) for row in rows}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
