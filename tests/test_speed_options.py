"""Memory and speed options of training: `train.gradient_checkpointing`, `train.channels_last`
and `train.bf16_autocast`. The first two change neither the loss nor the gradients; the
third is CUDA only and refused elsewhere (its GPU behaviour is not tested here)."""

import copy

import pyro
import pytest
import torch
from click.testing import CliRunner

from pyro_hvae import ConvLadderVAE
from pyro_hvae.cli import main
from pyro_hvae.config import architecture_changes, load_config
from pyro_hvae.infer.elbo import HierarchicalELBO
from pyro_hvae.run import read_metrics

CONV = [
    "model.kind=conv_ladder", "model.scales=[7]", "model.groups_per_scale=2", "model.latent_channels=2",
    "model.widths=16", "data.batch_size=16", "data.val_size=20", "data.eval_batch_size=20",
    "train.steps=4", "train.log_every=2", "train.eval_every=4", "train.kl_warmup_steps=4", "optim.warmup_steps=2",
]
SPEED = ["train.gradient_checkpointing=true", "train.channels_last=true"]


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return ConvLadderVAE((1, 8, 8), [4, 2], groups_per_scale=2, latent_channels=2, widths=8)


@pytest.fixture
def x():
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)).bernoulli()


def loss_and_grads(vae, x):
    """One training-mode loss and backward pass with a fixed sampling seed."""
    pyro.set_rng_seed(1)
    vae.train()
    with pyro.settings.context(module_local_params=True):
        loss = HierarchicalELBO()(vae.model, vae.guide)(x)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in vae.named_parameters()}


def saved_tensor_bytes(vae, x) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one loss."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    pyro.set_rng_seed(1)
    vae.train()
    with pyro.settings.context(module_local_params=True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        HierarchicalELBO()(vae.model, vae.guide)(x)
    return saved


def test_checkpointing_gives_the_same_loss_gradients_and_batch_norm_statistics(vae, x):
    plain, checkpointed = copy.deepcopy(vae), copy.deepcopy(vae)
    checkpointed.gradient_checkpointing = True
    loss_a, grads_a = loss_and_grads(plain, x)
    loss_b, grads_b = loss_and_grads(checkpointed, x)
    torch.testing.assert_close(loss_b, loss_a)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, msg=name)
    # the recomputation in the backward pass must not move the running statistics again
    for (name, a), b in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(b, a, msg=name)


def test_checkpointing_keeps_fewer_activations(vae, x):
    plain = saved_tensor_bytes(vae, x)
    vae.gradient_checkpointing = True
    assert vae.gradient_checkpointing
    assert saved_tensor_bytes(vae, x) < 0.7 * plain


def test_channels_last_gives_the_same_loss_and_gradients(vae, x):
    loss_a, grads_a = loss_and_grads(copy.deepcopy(vae), x)
    last = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    assert last.model.head.out[1].weight.is_contiguous(memory_format=torch.channels_last)
    loss_b, grads_b = loss_and_grads(last, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-4, msg=name)



def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_run_with_the_options_trains_as_one_without(tiny, tmp_path):
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    assert run("train", tiny, *CONV, "--out", plain, "--device", "cpu").exit_code == 0
    result = run("train", tiny, *CONV, *SPEED, "--out", fast, "--device", "cpu")
    assert result.exit_code == 0, result.output
    records = [read_metrics(d / "metrics.jsonl") for d in (plain, fast)]
    for a, b in zip(*records, strict=True):
        for key in ("loss", "elbo", "val_elbo"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_bf16_autocast_is_refused_on_cpu_with_one_line(tiny, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny, *CONV, "train.bf16_autocast=true", "--out", out, "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: train.bf16_autocast needs a CUDA device, but training runs on cpu; "
        "use --device cuda or set train.bf16_autocast=false"
    )
    assert not out.exists()


def test_checkpointing_a_model_without_cells_is_refused(tiny, tmp_path):
    out = tmp_path / "run"
    result = run("train", tiny, "model.latent_dims=[8,4]", "model.hidden_dims=[32,16]", "train.gradient_checkpointing=true",
                 "--out", out, "--device", "cpu")
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: train.gradient_checkpointing: ")
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_a_resume_may_switch_them(tiny):
    before = load_config(tiny, CONV)
    after = load_config(tiny, [*CONV, *SPEED, "train.bf16_autocast=true"])
    assert architecture_changes(before, after) == []
