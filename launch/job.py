"""The driver of a job that launch/submit.sh submits: ``noprop-dist train`` with its arguments,
or, where the job's interpreter (``NOPROP_PYTHON``) cannot import noprop_dist and its
dependencies, one line that names the fix instead of a traceback."""

import os
import sys

# As `python -m` would: the job's working directory is the checkout that submit.sh uploaded.
sys.path.insert(0, os.getcwd())
try:
    from noprop_dist.cli import main
except ImportError as exc:
    sys.exit(f"noprop-dist job: error: {sys.executable} cannot import noprop_dist ({exc}); run "
             "`bash launch/setup.sh` on the head and submit with NOPROP_PYTHON=/path/to/checkout/.venv/bin/python "
             "(an interpreter with noprop_dist's dependencies on every node)")
sys.exit(main(sys.argv[1:]))
