"""powerclip: DeepSpeed CLIP pretraining for compositional understanding."""

import importlib.abc
import importlib.machinery
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


class _TimmSummaryWithoutWandb(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads ``timm.utils.summary`` as if wandb were not installed.

    Importing open_clip imports timm, whose ``timm.utils.summary`` does ``try: import wandb`` for a
    logging helper powerclip never calls. Where wandb is installed that costs every process (each
    rank, each tool) over a second at start, and wandb's import creates two temporary folders
    (``tmp*wandb-media``, ``tmp*wandb-artifacts``) that are removed only at a normal interpreter exit:
    a rank that ends with ``os._exit`` after its collectives, or is killed, leaves them in /tmp. So
    that one module sees wandb as absent, unless wandb is already imported; powerclip's own wandb
    sink (``log.wandb.enabled``) and any other ``import wandb`` are untouched."""

    _MODULE = "timm.utils.summary"

    def find_spec(self, name, path, target=None):
        if name != self._MODULE or "wandb" in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        sys.modules["wandb"] = None  # makes ``import wandb`` raise ImportError, which timm expects
        try:
            self._inner.exec_module(module)
        finally:
            if sys.modules.get("wandb", 0) is None:
                del sys.modules["wandb"]


_per_environment_extension_builds()
if not any(isinstance(f, _TimmSummaryWithoutWandb) for f in sys.meta_path):
    sys.meta_path.insert(0, _TimmSummaryWithoutWandb())
