"""The `modelpress` command's entry point, kept outside the package: `import modelpress` loads torch (about a
second), and a Ctrl-C in that second would otherwise end the command with Python's traceback instead of the one line
and exit status 130 that a Ctrl-C gets later (modelpress.cli.main)."""
from __future__ import annotations

import sys


def main() -> int:
    try:
        from modelpress.cli import main as run
    except KeyboardInterrupt:
        print("modelpress: interrupted", file=sys.stderr)
        return 130
    return run()
