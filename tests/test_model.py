"""The model: open_clip-identical global embeddings, dense outputs per docs/losses.md §0, logit-scale clamp,
one text-tower call for captions + concepts + negatives, and weight loading."""

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from powerclip.data.batch import Batch
from powerclip.model import (
    DenseUnsupportedError,
    ModelLoadError,
    create_model,
    load_state_dict_into,
    model_cfg_dict,
    preprocess_cfg,
)
from tests.tiny import tiny_config, tiny_model_config

B, L = 3, 77


def _tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, L, dtype=torch.long)
    for i in range(n):
        length = 3 + i % 5
        out[i, 0] = 49406
        out[i, 1:1 + length] = torch.randint(1, 49000, (length,), generator=g)
        out[i, 1 + length] = 49407
    return out


def _batch(seed: int = 0, concepts: int = 0, negatives: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(keys=[str(i) for i in range(B)], images=torch.randn(B, 3, 32, 32, generator=g),
                 text=_tokens(B, seed),
                 concept_text=_tokens(concepts, seed + 1) if concepts else None,
                 concept_owner=torch.arange(concepts) % B if concepts else None,
                 neg_text=_tokens(B * negatives, seed + 2).reshape(B, negatives, L) if negatives else None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model(tiny_config().model).eval()


def test_pooled_embeddings_bit_identical_to_open_clip(model):
    batch = _batch()
    # training mode with autograd (the training path) ...
    model.train()
    feats = model(batch, dense=True)
    assert torch.equal(feats.image, model.clip.encode_image(batch.images, normalize=True))
    assert torch.equal(feats.text, model.clip.encode_text(batch.text, normalize=True))
    model.eval()
    # ... and eval mode without autograd (nn.MultiheadAttention's fused path, the inference path)
    with torch.no_grad():
        feats = model(batch, dense=True)
        ref_img = model.clip.encode_image(batch.images, normalize=True)
        ref_txt = model.clip.encode_text(batch.text, normalize=True)
    assert torch.equal(feats.image, ref_img)
    assert torch.equal(feats.text, ref_txt)
    with torch.no_grad():
        plain = model(batch, dense=False)
    assert torch.equal(plain.image, feats.image) and torch.equal(plain.text, feats.text)
    assert plain.patches is None and plain.tokens is None
    # the visual tower is left as open_clip built it (output_tokens restored)
    assert model.clip.visual.output_tokens is False
    # same weights in a plain open_clip model (what the export loads) give the same embeddings
    ref_model = open_clip.model.CLIP(**tiny_model_config()).eval()
    load_state_dict_into(ref_model, model.clip.state_dict())
    with torch.no_grad():
        assert torch.equal(ref_model.encode_image(batch.images, normalize=True), feats.image)
        assert torch.equal(ref_model.encode_text(batch.text, normalize=True), feats.text)


def test_dense_outputs_equal_brute_force(model):
    batch = _batch(1)
    clip = model.clip
    with torch.no_grad():
        feats = model(batch, dense=True)
        # image: proj(ln_post(x_t)) for every patch token t of the final layer, recomputed by hand
        v = clip.visual
        x = v.conv1(batch.images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(B, 1, -1), x], 1) + v.positional_embedding
        x = v.transformer(v.ln_pre(x))
        patches = F.normalize(v.ln_post(x[:, 1:]) @ v.proj, dim=-1)
        # text: text_projection(ln_final(x_l)) for every position
        t = clip.token_embedding(batch.text) + clip.positional_embedding
        t = clip.transformer(t, attn_mask=clip.attn_mask)
        tokens = F.normalize(clip.ln_final(t) @ clip.text_projection, dim=-1)
    assert feats.patches.shape == (B, 16, 64) and feats.tokens.shape == (B, L, 64)
    torch.testing.assert_close(feats.patches, patches, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.tokens, tokens, rtol=1e-5, atol=1e-6)
    # the pooled text is the EOT token's dense embedding
    eot = batch.text.argmax(-1)
    torch.testing.assert_close(feats.text, feats.tokens[torch.arange(B), eot], rtol=1e-5, atol=1e-6)


def test_one_text_call_for_captions_concepts_negatives(model):
    batch = _batch(2, concepts=4, negatives=2)
    calls = []
    handle = model.clip.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            feats = model(batch, dense=True)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert feats.concepts.shape == (4, 64) and feats.negatives.shape == (B, 2, 64)
    all_text = torch.cat([batch.text, batch.concept_text, batch.neg_text.reshape(-1, L)])
    with torch.no_grad():
        ref = model.clip.encode_text(all_text, normalize=True)
    assert torch.equal(feats.text, ref[:B])
    assert torch.equal(feats.concepts, ref[B:B + 4])
    assert torch.equal(feats.negatives, ref[B + 4:].reshape(B, 2, 64))
    assert feats.tokens.shape == (B, L, 64)


def test_logit_scale_clamped_where_used_but_never_below_pretrained(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = create_model(cfg.model)
    assert model.clip.logit_scale.shape == (1,)  # nonscalar for DeepSpeed
    torch.testing.assert_close(model(_batch()).logit_scale, torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.clip.logit_scale.fill_(6.0)  # training pushed it above ln(100)
    scale = model(_batch()).logit_scale
    assert scale.shape == () and math.isclose(scale.item(), 100.0, rel_tol=1e-5)
    assert model.clip.logit_scale.item() == 6.0  # parameter untouched: clamp is not in place
    # a pretrained model whose scale starts above the clamp keeps its own scale
    path = tmp_path / "weights.pt"
    sd = model.clip.state_dict()
    sd["logit_scale"] = torch.tensor(5.0)  # open_clip's 0-dim form
    torch.save(sd, path)
    cfg.model.pretrained = str(path)
    loaded = create_model(cfg.model)
    assert loaded.clip.logit_scale.shape == (1,)
    assert math.isclose(loaded(_batch()).logit_scale.item(), math.exp(5.0), rel_tol=1e-5)


def test_siglip_bias_and_grads_flow():
    cfg = tiny_config(["model.init_logit_bias=-10", "model.init_logit_scale=2.302585"])
    torch.manual_seed(0)
    model = create_model(cfg.model)
    assert model.clip.logit_bias.shape == (1,)
    feats = model(_batch(), dense=True)
    assert feats.logit_bias.shape == () and feats.logit_bias.item() == -10.0
    (feats.image.sum() + feats.text.sum() + feats.patches.sum() + feats.tokens.sum()
     + feats.logit_scale + feats.logit_bias).backward()
    assert model.clip.visual.proj.grad is not None and model.clip.text_projection.grad is not None
    assert model.clip.logit_scale.grad is not None
    assert model_cfg_dict(cfg.model)["init_logit_bias"] == -10.0


def test_builtin_name_and_preprocess_cfg():
    cfg = tiny_config()
    cfg.model.config, cfg.model.name = None, "ViT-S-32"  # the smallest built-in ViT (63M parameters)
    out = model_cfg_dict(cfg.model)
    assert out["embed_dim"] == 384 and "nonscalar_logit_scale" not in out
    built = create_model(cfg.model)
    assert type(built.clip).__name__ == "CLIP" and built.clip.logit_scale.shape == (1,)
    assert preprocess_cfg(built)["size"] in ((224, 224), [224, 224])
    del built
    torch.manual_seed(0)
    model = create_model(tiny_config(image_size=64).model)
    pre = preprocess_cfg(model)
    assert tuple(pre["size"]) == (64, 64) and len(pre["mean"]) == 3


def test_grad_checkpointing_keeps_outputs():
    torch.manual_seed(0)
    plain = create_model(tiny_config().model)
    torch.manual_seed(0)
    ckpt = create_model(tiny_config(["model.grad_checkpointing=true"]).model)
    batch = _batch()
    a, b = plain(batch, dense=True), ckpt(batch, dense=True)
    torch.testing.assert_close(a.image, b.image)
    torch.testing.assert_close(a.patches, b.patches)


def test_load_errors_are_clear(tmp_path):
    cfg = tiny_config([f"model.pretrained={tmp_path / 'missing.pt'}"])
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_model(cfg.model)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    cfg.model.pretrained = str(tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="missing keys"):
        create_model(cfg.model)


def test_dense_unsupported_pooling_fails_clearly():
    mc = tiny_model_config()
    mc["vision_cfg"]["final_ln_after_pool"] = True
    cfg = tiny_config()
    cfg.model.config = mc
    model = create_model(cfg.model)
    with pytest.raises(DenseUnsupportedError, match="ln_post"):
        model(_batch(), dense=True)


def _zero3_dense_case(rank: int, world: int) -> dict:
    """Forward + backward through DeepSpeed ZeRO-3 (parameters partitioned and released between
    module calls) with every dense path on, for an open_clip ViT and a timm MAP tower."""
    import copy

    import deepspeed

    from powerclip.config import ModelConfig
    from powerclip.losses.global_loss import global_loss
    from tests.test_dense_timm import TINY

    timm_cfg = {"embed_dim": 64, "init_logit_bias": -10,
                "vision_cfg": {"image_size": 32, "timm_model_name": TINY, "timm_pool": "map", "timm_proj": "none"},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    out = {}
    for name, mc in (("vit", tiny_model_config()), ("timm", timm_cfg)):
        torch.manual_seed(0)
        model = create_model(ModelConfig(config=copy.deepcopy(mc), init_logit_bias=-10.0))
        plain = copy.deepcopy(model)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            config={"train_batch_size": B, "zero_optimization": {"stage": 3},
                    "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1})
        batch = _batch(3, concepts=2, negatives=1)
        losses = []
        for m in (engine, plain):
            f = m(batch, dense=True)
            losses.append(global_loss(f, "siglip") + f.patches.pow(2).mean() + f.tokens.pow(2).mean()
                          + f.concepts.sum() + f.negatives.sum())
        engine.backward(losses[0])
        out[name] = torch.stack([x.detach() for x in losses])
    return out


def test_zero3_forward_backward_with_dense_paths():
    from tests.dist_helpers import run_on_ranks

    (res,) = run_on_ranks(_zero3_dense_case, 1)
    for name, (z3, plain) in res.items():
        torch.testing.assert_close(z3, plain, msg=name)


def test_custom_text_clip_dense_and_bit_identity():
    mc = tiny_model_config()
    mc["custom_text"] = True  # open_clip's CustomTextCLIP: the text tower is a TextTransformer module
    cfg = tiny_config()
    cfg.model.config = mc
    torch.manual_seed(0)
    model = create_model(cfg.model).eval()
    assert type(model.clip).__name__ == "CustomTextCLIP"
    batch = _batch(3)
    with torch.no_grad():
        feats = model(batch, dense=True)
        assert torch.equal(feats.text, model.clip.encode_text(batch.text, normalize=True))
        t = model.clip.text
        x = t.transformer(t.token_embedding(batch.text) + t.positional_embedding, attn_mask=t.attn_mask)
        tokens = F.normalize(t.ln_final(x) @ t.text_projection, dim=-1)
    torch.testing.assert_close(feats.tokens, tokens, rtol=1e-5, atol=1e-6)


def test_bias_from_the_open_clip_config_is_kept():
    mc = dict(tiny_model_config(), init_logit_bias=-10.0)  # like open_clip's built-in SigLIP configs
    cfg = tiny_config()
    cfg.model.config = mc
    model = create_model(cfg.model)
    assert model.clip.logit_bias is not None and model.clip.logit_bias.item() == -10.0
    assert model_cfg_dict(cfg.model)["init_logit_bias"] == -10.0
