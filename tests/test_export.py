"""Export to an open_clip folder: from a live model, from state dicts with training-only keys, and
from real DeepSpeed checkpoints of ZeRO stages 0-3 written by 2 gloo ranks; open_clip loads every
export strictly and its embeddings match the training model's."""

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from powerclip.checkpoints.discovery import CheckpointError, resolve_checkpoint
from powerclip.cli import main as cli_main
from powerclip.data.batch import Batch
from powerclip.export import ExportError, export_open_clip
from powerclip.model import create_model, model_cfg_dict, preprocess_cfg
from tests.dist_helpers import run_on_ranks
from tests.tiny import tiny_config

L = 77


def _tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, L, dtype=torch.long)
    out[:, 0] = 49406
    out[:, 1:5] = torch.randint(1, 49000, (n, 4), generator=g)
    out[:, 5] = 49407
    return out


def _batch(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(keys=[str(i) for i in range(n)], images=torch.randn(n, 3, 32, 32, generator=g),
                 text=_tokens(n, seed))


def _open_clip_embeddings(folder, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        return (model.encode_image(batch.images, normalize=True),
                model.encode_text(batch.text, normalize=True))


def _perturbed_model(overrides=()):
    torch.manual_seed(0)
    cfg = tiny_config(list(overrides))
    model = create_model(cfg.model)
    with torch.no_grad():  # look like a trained model, scale above the clamp included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.clip.logit_scale.fill_(4.8)
    return cfg, model.eval()


@pytest.mark.parametrize("overrides", [(), ("model.init_logit_bias=-10",)], ids=["clip", "siglip"])
def test_export_live_model_loads_in_open_clip(tmp_path, overrides):
    cfg, model = _perturbed_model(overrides)
    out = export_open_clip(model, model_cfg_dict(cfg.model), preprocess_cfg(model), tmp_path / "export")
    meta = json.loads((out / "open_clip_config.json").read_text())
    assert set(meta) == {"model_cfg", "preprocess_cfg"} and meta["preprocess_cfg"]["size"] == [32, 32]
    weights = load_file(out / "open_clip_model.safetensors")
    assert set(weights) == set(model.clip.state_dict())
    assert weights["logit_scale"].shape == () and weights["logit_scale"].item() == pytest.approx(4.8)
    if overrides:
        assert weights["logit_bias"].shape == ()
    batch = _batch(3, 1)
    img, txt = _open_clip_embeddings(out, batch)
    with torch.no_grad():
        feats = model(batch)
    assert (img - feats.image).abs().max() < 1e-5 and (txt - feats.text).abs().max() < 1e-5
    # the export folder is a valid model.pretrained: same embeddings, and its scale (above the
    # ln(100) clamp) is kept rather than clamped
    cfg.model.pretrained = str(out)
    reloaded = create_model(cfg.model).eval()
    with torch.no_grad():
        again = reloaded(batch)
    assert torch.equal(again.image, feats.image) and torch.equal(again.text, feats.text)
    assert again.logit_scale.item() == pytest.approx(float(torch.tensor(4.8).exp()), rel=1e-6)
    # re-export over the same folder replaces it atomically; no temp folders are left behind
    export_open_clip(model, model_cfg_dict(cfg.model), preprocess_cfg(model), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_strips_training_only_keys_and_keeps_nonscalar_on_request(tmp_path):
    cfg, model = _perturbed_model()
    _, other = _perturbed_model(["model.init_logit_scale=1.0"])
    state = {f"clip.{k}": v for k, v in model.clip.state_dict().items()}
    state.update({f"teacher.clip.{k}": v + 1 for k, v in other.clip.state_dict().items()})
    state["step_counter"] = torch.tensor(7)
    mc = dict(model_cfg_dict(cfg.model), nonscalar_logit_scale=True)
    out = export_open_clip(state, mc, preprocess_cfg(model), tmp_path / "e")
    weights = load_file(out / "open_clip_model.safetensors")
    assert set(weights) == set(model.clip.state_dict())
    assert weights["logit_scale"].shape == (1,)
    assert torch.equal(weights["visual.proj"], model.clip.visual.proj)
    with pytest.raises(ExportError, match="do not fit"):
        export_open_clip({"foo": torch.zeros(1)}, mc, {}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _train_and_save(rank: int, world: int, root: str, stages: list[int]) -> dict:
    """Per ZeRO stage: one real DeepSpeed step on this rank's half of a global batch, a checkpoint
    saved the way the trainer saves it, and the trained model's embeddings of a probe batch."""
    import deepspeed

    from powerclip.checkpoints.codec import install_safe_checkpoint_engine
    from powerclip.config import save_config
    from powerclip.losses.global_loss import global_loss

    out = {}
    probe = _batch(4, 99)
    for stage in stages:
        bf16 = stage == "0-bf16"
        stage = 0 if bf16 else stage
        torch.manual_seed(0)
        cfg = tiny_config([f"train.zero_stage={stage}"] + (["train.precision=bf16"] if bf16 else []))
        model = create_model(cfg.model)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "train_batch_size": 2 * world, "zero_optimization": {"stage": stage},
                     "bf16": {"enabled": bf16},
                     "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        install_safe_checkpoint_engine(engine)  # as the trainer does: export reads weights-only files
        if bf16:  # the bf16 weights the forward used; the export must hold their fp32 masters
            batch = _batch(2, rank).to("cpu", torch.bfloat16)
            feats = engine(batch, dense=True)
            engine.backward(global_loss(feats))
            engine.step()
            run = f"{root}/run0-bf16"
            if rank == 0:
                save_config(cfg, run)
            engine.save_checkpoint(f"{run}/checkpoints", tag="step1")
            out["0-bf16"] = {k: v.detach().clone() for k, v in engine.module.clip.state_dict().items()}
            continue
        feats = engine(_batch(2, rank), dense=True)
        loss = global_loss(feats) + feats.patches.mean() + feats.tokens.mean()  # dense paths get grads
        engine.backward(loss)
        engine.step()
        run = f"{root}/run{stage}"
        if rank == 0:
            save_config(cfg, run)
        engine.save_checkpoint(f"{run}/checkpoints", tag="step1")
        engine.eval()
        with torch.no_grad():
            feats = engine(probe)
        out[stage] = {"image": feats.image, "text": feats.text, "loss": loss.detach()}
    return out


def test_export_from_deepspeed_checkpoints_every_stage(tmp_path):
    stages = [0, 1, 2, 3]
    r0, r1 = run_on_ranks(_train_and_save, 2, str(tmp_path), stages + ["0-bf16"])
    # stage 0 in bf16: the export holds the fp32 masters, which round to the bf16 weights used
    out = tmp_path / "export0-bf16"
    assert cli_main(["export", str(tmp_path / "run0-bf16"), "--out", str(out)]) == 0
    weights = load_file(out / "open_clip_model.safetensors")
    low = r0["0-bf16"]
    assert set(weights) == set(low)
    for k, v in weights.items():
        assert v.dtype == torch.float32 and torch.equal(v.reshape(low[k].shape).to(torch.bfloat16), low[k]), k
    assert any(not torch.equal(v.reshape(low[k].shape), low[k].float()) for k, v in weights.items())
    torch.manual_seed(0)
    untrained = create_model(tiny_config().model).eval()
    probe = _batch(4, 99)
    with torch.no_grad():
        init = untrained(probe)
    for stage in stages:
        ref = r0[stage]
        torch.testing.assert_close(ref["image"], r1[stage]["image"])  # ranks agree on the weights
        assert (ref["image"] - init.image).abs().max() > 1e-3  # the step changed the weights
        run = tmp_path / f"run{stage}"
        # every accepted form of the source: run folder, checkpoint root, one tag folder
        sources = [run, run / "checkpoints", run / "checkpoints" / "step1"] if stage == 2 else [run]
        for i, src in enumerate(sources):
            out = tmp_path / f"export{stage}_{i}"
            assert cli_main(["export", str(src), "--out", str(out)]) == 0
            img, txt = _open_clip_embeddings(out, probe)
            assert (img - ref["image"]).abs().max() < 1e-5, f"stage {stage}"
            assert (txt - ref["text"]).abs().max() < 1e-5, f"stage {stage}"
        if stage in (0, 3):  # our checkpoints are valid model.pretrained sources too
            cfg = tiny_config([f"model.pretrained={run}"])
            with torch.no_grad():
                feats = create_model(cfg.model).eval()(probe)
            assert (feats.image - ref["image"]).abs().max() < 1e-5


def test_resolve_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a run folder"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no 'latest'"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("")
    with pytest.raises(CheckpointError, match="latest is empty"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    with pytest.raises(CheckpointError, match="points to 'step_00000002', which does not exist"):
        resolve_checkpoint(tmp_path)
    assert issubclass(ExportError, CheckpointError)  # one except clause serves export and checkpoint reads
