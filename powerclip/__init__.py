"""powerclip: DeepSpeed CLIP pretraining for compositional understanding."""

import os
import shutil
import sys

__version__ = "0.1.0"


def _per_environment_extension_builds() -> None:
    """DeepSpeed JIT-builds its CPU communication op (``deepspeed_shm_comm``) with ninja into torch's
    extension folder, by default one per user (~/.cache/torch_extensions). Two virtual environments
    (two clones, a CI checkout beside a working one) then rebuild it in turn, each for its own paths,
    and a rank that waits on the rebuild before the rendezvous makes the others time out. So, unless
    the user chose one, each environment gets its own folder inside it, where it is writable.

    The build runs the first ``ninja`` on PATH: an activated environment finds its own (pip's, a
    DeepSpeed dependency), a plain ``.venv/bin/python`` the system's; two ninja versions read each
    other's build log as another version's and rebuild everything (the same stall, seen in a test run
    after the demo). So where this environment has a ninja, its bin folder goes first on PATH, as
    activating it does."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    bindir = os.path.join(sys.prefix, "bin")
    own = os.path.join(bindir, "ninja")
    if os.path.isfile(own) and shutil.which("ninja") != own:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


_per_environment_extension_builds()
