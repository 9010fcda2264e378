"""train.grad_checkpointing: the same losses and gradients as without it, with the blocks' forward run again in
the backward pass (the recomputation that saves the memory), for every encoder kind and MAE's decoder."""
from __future__ import annotations

import pytest
import torch

from conftest import quick_config, small_model
from mpp.models import build_encoder
from test_objectives import OBJECTIVE_SETTINGS, TOKENIZER_SETTINGS, sample_images

STEPS = 2


def count_calls(modules) -> list[int]:
    """A one-element counter of the forward calls of `modules` (their `forward` wrapped: torch runs no forward
    hooks when checkpointing recomputes a module)."""
    calls = [0]

    def counted(forward):
        def call(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)
        return call

    for module in modules:
        module.forward = counted(module.forward)
    return calls


def train_steps(model, imgs: torch.Tensor, loss_fn, seed: int = 0):
    """STEPS AdamW steps on `imgs` -> (the losses, every step's gradients by name)."""
    torch.manual_seed(seed)  # the masks: drawn alike in both runs (checkpointing restores the RNG to recompute)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, grads = [], []
    model.train()
    for _ in range(STEPS):
        loss = loss_fn(model, imgs)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def compare(build, blocks_of, loss_fn, imgs):
    """Train `build()` with and without checkpointing: equal losses and gradients; the checkpointed run calls
    each of `blocks_of(model)` twice a step (forward, then again in backward), the plain run once."""
    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build(checkpointed)
        blocks = blocks_of(model)
        calls = count_calls(blocks)
        results[checkpointed] = train_steps(model, imgs, loss_fn)
        assert calls[0] == STEPS * len(blocks) * (2 if checkpointed else 1), (checkpointed, calls[0])
    (plain_losses, plain_grads), (ckpt_losses, ckpt_grads) = results[False], results[True]
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain_losses[-1] != plain_losses[0]  # the weights moved: gradients compared at two points
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        assert plain.keys() == ckpt.keys() and len(plain) > 10
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def pretrain_loss(model, imgs):
    return model(imgs).loss


def test_quickstart_model_from_the_config_switch(tmp_path):
    """The quickstart's MAE as mpp/pretrain.py builds it, train.grad_checkpointing on and off."""
    from mpp.pretrain import build_training, plan_schedule

    def build(checkpointed):
        cfg = quick_config(tmp_path, f"train.grad_checkpointing={str(checkpointed).lower()}")
        plan = plan_schedule(cfg, 1, 5000)
        return build_training(cfg, plan, torch.device("cpu"))[0]

    compare(build, lambda m: [*m.encoder.blocks, *m.head.blocks], pretrain_loss, sample_images(4))


def encoder_blocks(model):
    return list(model.encoder.blocks)


@pytest.mark.parametrize("tokenizer,settings", [
    ("patch", ["fuse_blocks=[1,3]"]),  # the fused blocks: each checkpointed on its own
    ("hybrid", OBJECTIVE_SETTINGS["simmim"]),  # the mask-aware CNN, not checkpointed, beside checkpointed blocks
    ("t2t", OBJECTIVE_SETTINGS["simmim"]),
    ("vt", OBJECTIVE_SETTINGS["simmim"]),  # VT's modules
])
def test_every_encoder_kind(tokenizer, settings):
    def build(checkpointed):
        model = small_model(*TOKENIZER_SETTINGS[tokenizer], *settings)
        model.set_grad_checkpointing(checkpointed)
        return model

    compare(build, encoder_blocks, pretrain_loss, sample_images(2))


@pytest.mark.parametrize("tokenizer", ["patch", "vt"])
def test_classifier(tokenizer):
    """Fine-tuning's classifier (timm's forward_features for the ViT, run_blocks for VT)."""
    from conftest import model_config
    labels = torch.arange(2) % 10

    def build(checkpointed):
        encoder = build_encoder(model_config(*TOKENIZER_SETTINGS[tokenizer], *OBJECTIVE_SETTINGS["simmim"]),
                                num_classes=10)
        encoder.set_grad_checkpointing(checkpointed)
        return encoder

    compare(build, lambda m: list(m.blocks), lambda m, x: torch.nn.functional.cross_entropy(m(x), labels),
            sample_images(2))
