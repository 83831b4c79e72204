"""``python -m powerclip ...`` is the same as the ``powerclip`` console script (used by sbatch/srun)."""

import sys

from powerclip.cli import main

sys.exit(main())
