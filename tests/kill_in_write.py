"""Run the colam command line and SIGKILL this very process inside a file write.

    python tests/kill_in_write.py NAME N colam-arguments...

The process kills itself in the N-th atomic write of a file called NAME, after the new bytes are
in the temporary file and before it is renamed over NAME: the moment at which a write that is
not atomic would leave a torn file. Used by tests/test_kill_resume.py.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    name, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    real_replace, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == name:
            seen.append(dst)
            if len(seen) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    from pipelines.cli import main as colam

    sys.exit(colam(argv))


if __name__ == "__main__":
    main()
