"""Patch dropout with the dense terms is refused at config load, in one line that says why; without a
dense term it is accepted. The reason is real: in training mode the tower's dense patch outputs then
hold fewer tokens than the patch grid the region masks are defined on."""

from __future__ import annotations

import json

import pytest
import torch

from powerclip.config import ConfigError
from tests.test_train_engine import MemoryLoader
from tests.tiny import tiny_config, tiny_model_config


def _with_dropout(p: float) -> str:
    mc = tiny_model_config()
    mc["vision_cfg"]["patch_dropout"] = p
    return f"model.config={json.dumps(mc)}"


@pytest.mark.parametrize("term", ["loss.powerset.weight=0.2", "loss.concept.xac_weight=0.01"])
def test_patch_dropout_with_a_dense_term_is_refused_in_one_line(term):
    with pytest.raises(ConfigError) as e:
        tiny_config([_with_dropout(0.5), term, *(["data.concepts=true"] if "concept" in term else [])])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.config.vision_cfg.patch_dropout=0.5 cannot train with")
    assert term.split("=")[0] + " > 0" in msg and "set patch_dropout to 0" in msg


def test_patch_dropout_without_dense_terms_is_accepted_and_drops_patch_tokens():
    from powerclip.data.batch import Batch
    from powerclip.model.factory import create_model

    cfg = tiny_config([_with_dropout(0.5)])  # plain CLIP: accepted
    model = create_model(cfg.model).train()
    items = [MemoryLoader.sample(i) for i in range(2)]
    batch = Batch(keys=["0", "1"], images=torch.stack([x[0] for x in items]),
                  text=torch.stack([x[1] for x in items]))
    grid = (32 // 8) ** 2
    assert create_model(tiny_config().model).train()(batch, dense=True).patches.shape[1] == grid
    assert model(batch, dense=True).patches.shape[1] < grid  # what the region masks could not index
