"""The model: open_clip towers, dense outputs (docs/losses.md §0) and the Features they produce."""

from powerclip.model.clip_model import DenseUnsupportedError, PowerClipModel
from powerclip.model.factory import (
    ModelLoadError,
    build_model_from_dict,
    create_model,
    load_state_dict_into,
    model_cfg_dict,
    preprocess_cfg,
    reference_model,
)
from powerclip.model.features import Features

__all__ = ["DenseUnsupportedError", "Features", "ModelLoadError", "PowerClipModel", "build_model_from_dict",
           "create_model", "load_state_dict_into", "model_cfg_dict", "preprocess_cfg", "reference_model"]
