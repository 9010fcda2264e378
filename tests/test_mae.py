"""The MAE model: masking invariants, the masked-only loss, patchify, and the timm encoder mapping."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mpp.models import VIT_SIZES, set_fused_attn
from mpp.models.batch_losses import contrastive_loss, uniformity_loss
from mpp.models.mae import MAE, gather_tokens, patchify, random_masking, unpatchify


def small_mae(**kwargs) -> MAE:
    """ViT-Tiny/4 on 32 px (64 patches) with a small decoder, as in recipes/quickstart.yaml."""
    args = dict(encoder="tiny", img_size=32, patch_size=4, decoder_dim=64, decoder_depth=1, decoder_heads=4)
    return MAE(**{**args, **kwargs})


# ---- random_masking ----

MASK_CASES = [(64, 0.75), (196, 0.75), (16, 0.5), (10, 0.75), (49, 0.9), (7, 0.3), (256, 0.6)]


@pytest.mark.parametrize("num_patches,ratio", MASK_CASES)
def test_masking_keeps_round_n_times_visible_fraction(num_patches, ratio):
    batch = 6
    keep = round(num_patches * (1 - ratio))
    gen = torch.Generator().manual_seed(num_patches)
    ids_keep, mask, ids_restore = random_masking(batch, num_patches, ratio, generator=gen)

    assert ids_keep.shape == (batch, keep)
    assert mask.shape == ids_restore.shape == (batch, num_patches)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(dim=1).tolist() == [num_patches - keep] * batch
    # Kept ids are distinct patches, and exactly the ones the mask marks visible.
    for b in range(batch):
        kept = ids_keep[b].tolist()
        assert len(set(kept)) == keep
        assert sorted(kept) == torch.nonzero(mask[b] == 0).flatten().tolist()


@pytest.mark.parametrize("num_patches,ratio", MASK_CASES)
def test_ids_restore_inverts_the_shuffle(num_patches, ratio):
    batch = 5
    keep = round(num_patches * (1 - ratio))
    gen = torch.Generator().manual_seed(1)
    ids_keep, mask, ids_restore = random_masking(batch, num_patches, ratio, generator=gen)

    raster = torch.arange(num_patches)
    for b in range(batch):  # each row is a permutation of 0..N-1
        assert torch.equal(ids_restore[b].sort().values, raster)

    # The decoder's path: [visible tokens..., mask tokens...] gathered by ids_restore must put every
    # visible token back at its own raster position and a mask token at every masked position.
    tokens = raster.float().view(1, -1, 1).expand(batch, -1, 2)  # token value = its raster index
    visible = gather_tokens(tokens, ids_keep)
    filler = torch.full((batch, num_patches - keep, 2), -1.0)
    restored = gather_tokens(torch.cat([visible, filler], dim=1), ids_restore)[..., 0]
    expected = torch.where(mask.bool(), torch.tensor(-1.0), raster.float().expand(batch, -1))
    assert torch.equal(restored, expected)

    # ids_restore is the inverse of the shuffle whose first `keep` entries are ids_keep.
    ids_shuffle = ids_restore.argsort(dim=1)
    assert torch.equal(ids_shuffle[:, :keep], ids_keep)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), raster.expand(batch, -1))


def test_masks_differ_between_samples_and_calls():
    gen = torch.Generator().manual_seed(0)
    _, mask, _ = random_masking(16, 64, 0.75, generator=gen)
    assert len({tuple(row.tolist()) for row in mask}) == 16
    _, again, _ = random_masking(16, 64, 0.75, generator=gen)
    assert not torch.equal(mask, again)
    # The same generator seed gives the same masks.
    _, replay, _ = random_masking(16, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, replay)


def test_model_forward_masks_its_ratio_per_sample():
    torch.manual_seed(0)
    model = small_mae(mask_ratio=0.75).eval()
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        loss, pred, mask = model(imgs)
        _, _, mask_half = model(imgs, mask_ratio=0.5)
    assert pred.shape == (4, 64, 4 * 4 * 3)
    assert mask.sum(dim=1).tolist() == [48.0] * 4
    assert mask_half.sum(dim=1).tolist() == [32.0] * 4
    assert len({tuple(row.tolist()) for row in mask}) == 4
    assert torch.isfinite(loss) and loss.item() > 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 0.999])
def test_mask_ratio_that_leaves_nothing_is_refused(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        small_mae(mask_ratio=ratio)


# ---- the loss ----

def patch_region(index: int, grid_w: int, p: int) -> tuple[slice, slice]:
    row, col = divmod(index, grid_w)
    return slice(row * p, (row + 1) * p), slice(col * p, (col + 1) * p)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_sees_only_masked_patches(norm_pix):
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=norm_pix)
    gen = torch.Generator().manual_seed(3)
    imgs = torch.randn(3, 3, 32, 32, generator=gen)
    pred = torch.randn(3, 64, 48, generator=gen)
    _, mask, _ = random_masking(3, 64, 0.75, generator=gen)
    base = model.loss(imgs, pred, mask)

    sample = 1
    visible = torch.nonzero(mask[sample] == 0).flatten()
    masked = torch.nonzero(mask[sample] == 1).flatten()
    assert len(visible) == 16 and len(masked) == 48

    # New random pixels (not a shift or scale: norm-pix would cancel those) in visible patches: same loss, bit for bit.
    changed = imgs.clone()
    for index in visible[:5].tolist():
        rows, cols = patch_region(index, 8, 4)
        changed[sample, :, rows, cols] = torch.randn(3, 4, 4, generator=gen) * 3
    assert torch.equal(model.loss(changed, pred, mask), base)

    # New pixels in one masked patch: the loss moves.
    changed = imgs.clone()
    rows, cols = patch_region(masked[0].item(), 8, 4)
    changed[sample, :, rows, cols] = torch.randn(3, 4, 4, generator=gen) * 3
    assert abs(model.loss(changed, pred, mask).item() - base.item()) > 1e-4

    # And predictions: only those of masked patches count.
    changed_pred = pred.clone()
    changed_pred[sample, visible] += 10.0
    assert torch.equal(model.loss(imgs, changed_pred, mask), base)
    changed_pred = pred.clone()
    changed_pred[sample, masked[0]] += 10.0
    assert model.loss(imgs, changed_pred, mask).item() > base.item()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_is_mean_squared_error_over_masked_patches(norm_pix):
    torch.manual_seed(0)
    model = small_mae(norm_pix_loss=norm_pix)
    gen = torch.Generator().manual_seed(4)
    imgs = torch.randn(2, 3, 32, 32, generator=gen)
    pred = torch.randn(2, 64, 48, generator=gen)
    _, mask, _ = random_masking(2, 64, 0.75, generator=gen)

    # Independent reference: per patch, pixels (row, col, channel) of each 4x4 patch in raster order.
    target = imgs.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, 8, 8, 4, 4)
    target = target.permute(0, 2, 3, 4, 5, 1).reshape(2, 64, 48)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(model.loss(imgs, pred, mask), expected, rtol=1e-6, atol=1e-6)


# ---- patchify ----

@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 3, 32, 48), 8), ((3, 1, 16, 8), 4), ((2, 3, 224, 224), 16)])
def test_patchify_round_trips_exactly(shape, p):
    b, c, h, w = shape
    imgs = torch.randn(*shape)
    patches = patchify(imgs, p)
    assert patches.shape == (b, (h // p) * (w // p), p * p * c)
    assert torch.equal(unpatchify(patches, p, (h // p, w // p), c), imgs)


def test_patchify_orders_patches_in_raster_and_pixels_row_col_channel():
    imgs = torch.randn(2, 3, 16, 24)
    patches = patchify(imgs, 8)  # grid 2 x 3
    for index in range(6):
        rows, cols = patch_region(index, 3, 8)
        expected = imgs[:, :, rows, cols].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(patches[:, index], expected)


# ---- the encoder is timm's ViT ----

@pytest.mark.parametrize("size,img_size,patch_size,fused", [("tiny", 32, 4, False), ("tiny", 32, 4, True),
                                                           ("small", 64, 16, False)])
def test_encoder_is_a_timm_vit(size, img_size, patch_size, fused):
    torch.manual_seed(0)
    mae = small_mae(encoder=size, img_size=img_size, patch_size=patch_size).eval()
    set_fused_attn(mae, fused)
    width, depth, heads = VIT_SIZES[size]
    vit = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                            embed_dim=width, depth=depth, num_heads=heads).eval()
    vit.load_state_dict(mae.encoder.state_dict(), strict=True)

    imgs = torch.randn(3, 3, img_size, img_size)
    n = mae.num_patches
    all_visible = torch.arange(n).expand(3, n)
    with torch.no_grad():
        ours = mae.forward_encoder(imgs, all_visible)
        theirs = vit.forward_features(imgs)
        # Visible patches in any order: the same features, in that order (the encoder is permutation-equivariant).
        order = torch.stack([torch.randperm(n) for _ in range(3)])
        shuffled = mae.forward_encoder(imgs, order)
    assert ours.shape == theirs.shape == (3, 1 + n, width)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (shuffled[:, 0] - theirs[:, 0]).abs().max().item() < 1e-4
    assert (shuffled[:, 1:] - gather_tokens(theirs[:, 1:], order)).abs().max().item() < 1e-4


def test_encoder_position_embedding_is_fixed_sincos():
    mae = small_mae()
    pos = mae.encoder.pos_embed
    assert not pos.requires_grad and not mae.decoder_pos_embed.requires_grad
    assert pos.shape == (1, 65, 192)
    assert torch.equal(pos[0, 0], torch.zeros(192))  # the class token's row
    assert pos[0, 1:].abs().max().item() <= 1.0 and len({tuple(r.tolist()) for r in pos[0, 1:]}) == 64


# ---- U-MAE's uniformity term ----

def test_uniformity_loss_is_one_when_collapsed_and_one_over_batch_when_orthogonal():
    width, batch = 8, 4
    # Every image's feature a positive multiple of the same one: one direction.
    collapsed = torch.randn(1, width).expand(batch, -1) * (torch.rand(batch, 1) + 0.5)
    assert uniformity_loss(collapsed).item() == pytest.approx(1.0, abs=1e-6)
    # Each image's feature a distinct basis vector.
    orthogonal = 2.0 * torch.eye(width)[:batch]
    assert uniformity_loss(orthogonal).item() == pytest.approx(1 / batch, abs=1e-6)
    # Against a loop over pairs.
    features = torch.randn(6, width, generator=torch.Generator().manual_seed(0))
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0) ** 2 for a in features for b in features]
    torch.testing.assert_close(uniformity_loss(features), torch.stack(pairs).mean(), rtol=1e-5, atol=1e-6)


def test_uniformity_weight_adds_its_term_to_the_reconstruction_loss():
    torch.manual_seed(0)
    plain = small_mae()
    regularised = small_mae(uniformity=0.5)
    regularised.load_state_dict(plain.state_dict())
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    plain_loss, _, _ = plain(imgs)
    torch.manual_seed(2)
    ids_keep, _, _ = random_masking(4, 64, 0.75)
    term = uniformity_loss(plain.forward_encoder(imgs, ids_keep)[:, 1:].mean(1))
    torch.manual_seed(2)
    loss, _, _ = regularised(imgs)
    assert term.item() > 0.1
    torch.testing.assert_close(loss, plain_loss + 0.5 * term, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uniformity"):
        small_mae(uniformity=-1.0)


# ---- the contrastive term (SimCLR's NT-Xent between two views) ----

def test_contrastive_loss_against_its_formula_and_a_loop():
    batch, t = 3, 0.1
    # Twins identical, every other pair orthogonal: each row's softmax has e^(1/t) against 2B - 2 ones.
    z = torch.eye(2 * batch)[:batch].repeat(2, 1) * 3.0
    expected = -torch.log(torch.tensor(1 / t).exp() / (torch.tensor(1 / t).exp() + 2 * batch - 2))
    torch.testing.assert_close(contrastive_loss(z, t), expected, rtol=1e-5, atol=1e-6)
    # Random embeddings against a loop over rows.
    z = torch.randn(2 * batch, 5, generator=torch.Generator().manual_seed(0))
    zn = torch.nn.functional.normalize(z, dim=-1)
    terms = []
    for i in range(2 * batch):
        twin = (i + batch) % (2 * batch)
        others = [j for j in range(2 * batch) if j != i]
        sims = torch.stack([zn[i] @ zn[j] / t for j in others])
        terms.append(torch.logsumexp(sims, 0) - zn[i] @ zn[twin] / t)
    torch.testing.assert_close(contrastive_loss(z, t), torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


def test_batch_terms_run_in_float32_under_autocast():
    # Under bf16 autocast the B x B similarity matmul would round logits of cos / 0.1 (up to 10) by ~0.05;
    # the terms opt out of autocast and give the float32 values.
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    exact = contrastive_loss(z, 0.1), uniformity_loss(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_loss(z, 0.1), uniformity_loss(z)
    for m, e in zip(mixed, exact):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m, e, rtol=1e-6, atol=1e-6)


def test_contrastive_weight_adds_its_term_over_both_views():
    from mpp.models.views import random_view
    torch.manual_seed(0)
    model = small_mae(contrastive=0.3, contrastive_temperature=0.2)
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss, pred, mask = model(imgs)
    assert pred.shape[0] == mask.shape[0] == 8  # the batch and its second views
    torch.manual_seed(2)
    both = torch.cat([imgs, random_view(imgs)])
    ids_keep, mask_ref, ids_restore = random_masking(8, 64, 0.75)
    latent = model.forward_encoder(both, ids_keep)
    reconstruction = model.loss(both, model.forward_decoder(latent, ids_restore), mask_ref)
    term = contrastive_loss(model.projector(latent[:, 1:].mean(1)), 0.2)
    assert torch.equal(mask, mask_ref) and term.item() > 0.5
    torch.testing.assert_close(loss, reconstruction + 0.3 * term, rtol=1e-5, atol=1e-6)
    # In eval mode (reconstruction previews) the model is plain MAE on the images given.
    model.eval()
    _, pred, _ = model(imgs)
    assert pred.shape[0] == 4
    with pytest.raises(ValueError, match="contrastive"):
        small_mae(contrastive=-1.0)
    with pytest.raises(ValueError, match="contrastive_temperature"):
        small_mae(contrastive=1.0, contrastive_temperature=0.0)
    assert small_mae().projector is None  # plain MAE carries no head


# ---- fuse_blocks (MFF): earlier blocks' outputs join the last one's in the decoder's input ----

def test_fuse_blocks_feeds_the_decoder_a_weighted_sum_of_blocks():
    torch.manual_seed(0)
    model = small_mae(fuse_blocks=[3, 1])
    with torch.no_grad():
        model.fusion_weights.copy_(torch.tensor([0.5, -1.0, 2.0]))  # blocks 1, 3 and the last (11)
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids_keep, _, _ = random_masking(3, 64, 0.75, generator=torch.Generator().manual_seed(2))
    # The reference: the same tokens through the blocks one by one.
    enc = model.encoder
    x = gather_tokens(enc.patch_embed(imgs) + enc.pos_embed[:, 1:], ids_keep)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(3, -1, -1), x], dim=1)
    outputs = []
    for block in enc.blocks:
        x = block(x)
        outputs.append(x)
    w = torch.tensor([0.5, -1.0, 2.0]).softmax(0)
    expected = enc.norm(w[0] * model.fusion_proj[0](outputs[1]) + w[1] * model.fusion_proj[1](outputs[3])
                        + w[2] * outputs[11])
    torch.testing.assert_close(model.forward_encoder(imgs, ids_keep), expected, rtol=1e-5, atol=1e-5)
    # Without fused blocks the decoder reads the last block alone (MAE), and no fusion weights exist.
    plain = small_mae()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(plain.forward_encoder(imgs, ids_keep), enc.norm(outputs[11]), rtol=1e-5, atol=1e-5)
    assert plain.fusion_weights is None and len(plain.fusion_proj) == 0


def test_fuse_blocks_train_their_layers_and_weights_and_reject_bad_indices():
    torch.manual_seed(0)
    model = small_mae(fuse_blocks=[0, 5])
    loss, _, _ = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    loss.backward()
    assert model.fusion_weights.grad.abs().min() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.fusion_proj.parameters())
    for bad in ([11], [-1], [12]):  # the last block is always fused; indices are 0-based
        with pytest.raises(ValueError, match=r"fuse_blocks .*blocks 0 to 10 of the 12-block encoder"):
            small_mae(fuse_blocks=bad)
