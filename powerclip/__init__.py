"""powerclip: DeepSpeed CLIP pretraining for compositional understanding."""

import os
import sys

__version__ = "0.1.0"


def _per_environment_extensions_dir() -> None:
    """DeepSpeed JIT-builds its CPU communication op (``deepspeed_shm_comm``) into torch's extension
    folder, by default one per user (~/.cache/torch_extensions). Two virtual environments (two clones,
    a CI checkout beside a working one) then rebuild it in turn, each for its own paths, and a rank
    that waits on the rebuild before the rendezvous makes the others time out. So, unless the user
    chose one, each environment gets its own folder inside it, where it is writable."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")


_per_environment_extensions_dir()
