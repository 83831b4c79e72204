"""Read checkpoint files without ever running code from them, and consolidate ZeRO shards that way.

A checkpoint folder may come from someone else (``powerclip export``, ``powerclip eval --model``,
``model.pretrained=``). ``torch.load`` with ``weights_only=False`` unpickles arbitrary objects, i.e.
runs whatever code the file names, and DeepSpeed's ``zero_to_fp32`` loads every shard that way. So
every file here is read with ``torch.load(weights_only=True)``; our own files hold only tensors and
primitives (``SafeCheckpointEngine`` encodes DeepSpeed's helper objects), and the tagged DeepSpeed
objects in them are rebuilt by ``codec.decode``, which only ever instantiates ``deepspeed.*``
classes without calling their code. A file that needs anything else is refused, naming the file.

The ZeRO 1/2/3 reassembly itself is DeepSpeed's own (``zero_to_fp32``'s merge helpers): only the
two functions that parse the files are re-done here, with safe loads.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from powerclip.checkpoints.codec import decode
from powerclip.errors import UserError


class CheckpointReadError(UserError, RuntimeError):
    """A checkpoint file cannot be read safely; the message names the file and the reason."""


def _reason(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    # torch's weights_only refusal is a long paragraph; the line naming the global is the useful one
    named = [x for x in lines if "GLOBAL" in x or "Unsupported" in x]
    return (named or lines or [type(e).__name__])[0][:300]


def _torch_load(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        # a file in torch's legacy (non-zip) format cannot be mapped; a damaged one fails again here
        return torch.load(path, map_location="cpu", weights_only=True)


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's tagged objects rebuilt.

    ``mmap``: map the file instead of reading it, so a caller that needs only a small part of a
    large file (the client state beside the module weights) reads only that part.

    Raises ``CheckpointReadError`` naming ``path`` when the file is unreadable, truncated, or would
    need to run code to load.
    """
    path = Path(path)
    try:
        obj = _torch_load(path, mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(f"{path}: refusing to load: the file holds objects other than tensors "
                                  f"and primitives (loading it would run code): {_reason(e)}") from None
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad magic...: all mean "unreadable file"
        raise CheckpointReadError(f"{path}: unreadable checkpoint file (truncated or corrupted?): "
                                  f"{_reason(e)}") from None
    return decode(obj)


def _model_states(files: list[str]) -> list[Any]:
    """``zero_to_fp32.parse_model_states`` with safe loads (same output)."""
    from deepspeed.utils import zero_to_fp32 as z

    out = []
    for file in files:
        sd = safe_load(file)
        if not isinstance(sd, dict) or z.BUFFER_NAMES not in sd:
            raise CheckpointReadError(f"{file}: not a DeepSpeed model state file (no {z.BUFFER_NAMES!r})")
        buffer_names = sd[z.BUFFER_NAMES]
        buffers = {k: v.float() if v.is_floating_point() else v
                   for k, v in sd["module"].items() if k in buffer_names}
        out.append(z.zero_model_state(buffers=buffers, param_shapes=sd[z.PARAM_SHAPES],
                                      shared_params=[[k, v] for k, v in sd["shared_params"].items()],
                                      ds_version=sd.get(z.DS_VERSION),
                                      frozen_param_shapes=sd.get(z.FROZEN_PARAM_SHAPES),
                                      frozen_param_fragments=sd.get(z.FROZEN_PARAM_FRAGMENTS)))
    return out


def _optim_states(files: list[str], tag_dir: Path) -> tuple[int, int, list[Any], Any]:
    """``zero_to_fp32.parse_optim_states`` with safe loads (same output)."""
    from deepspeed.utils import zero_to_fp32 as z

    states = []
    for f in files:
        sd = safe_load(f, mmap=True)
        osd = sd.get(z.OPTIMIZER_STATE_DICT) if isinstance(sd, dict) else None
        if not isinstance(osd, dict) or z.ZERO_STAGE not in osd:
            raise CheckpointReadError(f"{f}: not a ZeRO optimizer state file")
        osd.pop("optimizer_state_dict", None)  # Adam moments: not needed for the weights
        states.append(osd)
    stage, world = int(states[0][z.ZERO_STAGE]), states[0][z.PARTITION_COUNT]
    world = max(world) if isinstance(world, list) else int(world)
    if world != len(files):
        raise CheckpointReadError(f"{tag_dir}: the checkpoint was saved by {world} ranks but holds "
                                  f"{len(files)} *_optim_states.pt files (an incomplete save?)")
    key = z.SINGLE_PARTITION_OF_FP32_GROUPS if stage <= 2 else z.FP32_FLAT_GROUPS
    groups = [s[key] for s in states]
    return stage, world, groups, states[0].get(z.PARAM_ALIGNMENT_PADDINGS)


def consolidate_zero(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a ZeRO 1/2/3 checkpoint folder, every file loaded weights-only."""
    from deepspeed.utils import zero_to_fp32 as z

    tag_dir = Path(tag_dir)
    models = _model_states(z.get_model_state_files(str(tag_dir)))
    stage, world, groups, paddings = _optim_states(z.get_optim_files(str(tag_dir)), tag_dir)
    if stage <= 2:
        sd = z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, models, False, paddings)
    elif stage == 3:
        sd = z._get_fp32_state_dict_from_zero3_checkpoint(world, groups, models, False)
    else:
        raise CheckpointReadError(f"{tag_dir}: unknown ZeRO stage {stage}")
    return {k: v.contiguous() for k, v in z.to_torch_tensor(sd).items()}
