"""BNStatAlignmentLoss against a hand-written DeepInversion hook, and bn_stats_loss(sync=True) across processes."""
from __future__ import annotations

import copy
import datetime
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ddg_ops
from ddg_losses import BNStatAlignmentLoss

torchvision = pytest.importorskip("torchvision")

GRAD_SCALE = 2.7  # a non-unit upstream gradient: d(GRAD_SCALE * loss)/d(image)


# --------------------------------------------------------------------------------------------
# The reference: DeepInversion's DeepInversionFeatureHook (NVlabs/DeepInversion deepinversion.py),
# written out here, with the squared form of the DDIS paper as the alternative.
# --------------------------------------------------------------------------------------------
class DeepInversionFeatureHook:
    def __init__(self, module, form):
        self.form = form
        self.hook = module.register_forward_hook(self.hook_fn)
        self.r_feature = None

    def hook_fn(self, module, input, output):
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        if self.form == "unsquared":
            r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)
        else:
            r_feature = (module.running_var.data - var).pow(2).sum() + (module.running_mean.data - mean).pow(2).sum()
        self.r_feature = r_feature

    def close(self):
        self.hook.remove()


def deepinversion_loss(model, image, names, form, weights):
    """sum_l weights[l] * R_l, where weights already include the first-BN multiplier; plus per-layer R_l."""
    modules = dict(model.named_modules())
    hooks = {n: DeepInversionFeatureHook(modules[n], form) for n in names}
    try:
        model(image)
    finally:
        for h in hooks.values():
            h.close()
    per_layer = {n: weights[n] * hooks[n].r_feature for n in names}
    return sum(per_layer.values()), per_layer


def bn_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def resnet18_with_stats(seed=0):
    """A ResNet-18 whose BN running stats are not the init values (0, 1): a few train-mode forwards."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 64, 64) * 1.5 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    return resnet18_with_stats()


def _image(dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)


def _loss_and_grad(loss_fn, image):
    loss = loss_fn()
    (grad,) = torch.autograd.grad(GRAD_SCALE * loss, image)
    return loss.detach(), grad


def test_running_stats_are_nontrivial(resnet):
    # Guards the fixture: with init running stats (0, 1) several checks below would be weaker.
    bn = resnet.layer2[0].bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


CONFIGS = {
    "all_layers": dict(layers=None, first_bn_multiplier=1.0, layer_weights=None),
    "deepinversion_first_bn_10": dict(layers=None, first_bn_multiplier=10.0, layer_weights=None),
    "subset_in_given_order": dict(layers=["layer1.0.bn1", "bn1", "layer4.1.bn2"], first_bn_multiplier=3.0,
                                  layer_weights=[0.5, 2.0, 1.25]),
    "dict_weights": dict(layers=None, first_bn_multiplier=10.0,
                         layer_weights={"bn1": 0.5, "layer3.1.bn2": 4.0, "layer4.0.downsample.1": 0.125}),
}


def _expected_weights(model, cfg):
    names = cfg["layers"] or bn_names(model)
    lw = cfg["layer_weights"]
    if lw is None:
        weights = {n: 1.0 for n in names}
    elif isinstance(lw, dict):
        weights = {n: lw.get(n, 1.0) for n in names}
    else:
        weights = dict(zip(names, lw))
    weights[names[0]] *= cfg["first_bn_multiplier"]
    return names, weights


@pytest.mark.parametrize("form", ["unsquared", "squared"])
@pytest.mark.parametrize("dtype,config", [pytest.param(torch.float64, c, id=f"fp64-{c}") for c in CONFIGS] + [
    pytest.param(torch.float32, c, id=f"fp32-{c}") for c in ("deepinversion_first_bn_10", "subset_in_given_order")])
def test_matches_deepinversion_hook(resnet, form, config, dtype):
    cfg = CONFIGS[config]
    model = copy.deepcopy(resnet).to(dtype)
    names, weights = _expected_weights(model, cfg)
    if config == "all_layers":
        assert len(names) == 20  # every BatchNorm2d of ResNet-18, downsample BNs included

    image = _image(dtype)
    ref_total, ref_layers = deepinversion_loss(model, image, names, form, weights)
    (ref_grad,) = torch.autograd.grad(GRAD_SCALE * ref_total, image)

    bn_loss = BNStatAlignmentLoss(model, form=form, **cfg)
    assert bn_loss.layers == tuple(names)
    model(image)
    loss, grad = _loss_and_grad(bn_loss, image)

    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
        gtol = dict(rtol=1e-9, atol=1e-9 * float(ref_grad.abs().max()))
    else:
        tol = dict(rtol=1e-5, atol=1e-5)
        gtol = dict(rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, ref_total.detach(), **tol)
    torch.testing.assert_close(grad, ref_grad, **gtol)
    logged = bn_loss.per_layer()
    assert set(logged) == set(names)
    for n in names:
        torch.testing.assert_close(logged[n], ref_layers[n].detach(), **tol)
    # The weights matter: the unweighted sum is a different number (guards against ignoring them).
    if cfg["first_bn_multiplier"] != 1.0 or cfg["layer_weights"] is not None:
        unweighted = sum(ref_layers[n].detach() / weights[n] for n in names)
        assert not torch.allclose(loss, unweighted, rtol=1e-3)
    bn_loss.remove()


def test_forms_differ_and_hooks_do_not_change_logits(resnet):
    model = copy.deepcopy(resnet).double()
    image = _image(torch.float64)
    with torch.no_grad():
        plain = model(image)
    with BNStatAlignmentLoss(model, form="unsquared") as a, BNStatAlignmentLoss(model, form="squared") as b:
        with torch.no_grad():
            hooked = model(image)
        la, lb = a(), b()
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert not torch.allclose(la, lb, rtol=1e-3)


def test_eval_mode_targets_are_running_stats_and_unchanged(resnet):
    model = copy.deepcopy(resnet).double()
    names = bn_names(model)
    before = copy.deepcopy(model.state_dict())
    image = _image(torch.float64)
    expected, _ = deepinversion_loss(model, image, names, "unsquared", {n: 1.0 for n in names})
    with BNStatAlignmentLoss(model) as bn_loss:
        model(image)
        torch.testing.assert_close(bn_loss(), expected, rtol=1e-10, atol=1e-10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_mode_scores_against_stats_before_the_forward(resnet):
    """Targets are the running stats held before the scored forward (snapshotted in a pre-hook),
    not the ones BN's train-mode forward has just moved toward this very batch (DeepInversion's
    literal hook would read the latter). BN's own running-stat update is left untouched."""
    model = copy.deepcopy(resnet).double().train()
    untouched = copy.deepcopy(model)
    names = bn_names(model)
    image = _image(torch.float64)

    # Reference: DeepInversion's R_l on each BN input, against explicit copies of the stats taken before the forward.
    stats_before = {n: (m.running_mean.clone(), m.running_var.clone())
                    for n, m in model.named_modules() if n in names}
    inputs = {}
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: inputs.__setitem__(n, i[0])) for n in names]

    with BNStatAlignmentLoss(model) as bn_loss:
        logits = model(image)
        loss = bn_loss()
    for h in handles:
        h.remove()

    def r(n, stats):
        x = inputs[n]
        c = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view(c, -1).var(1, unbiased=False)
        return torch.norm(stats[n][1] - var, 2) + torch.norm(stats[n][0] - mean, 2)

    expected = sum(r(n, stats_before) for n in names)
    (grad,) = torch.autograd.grad(GRAD_SCALE * loss, image, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(GRAD_SCALE * expected, image)
    loss = loss.detach()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9 * float(expected_grad.abs().max()))

    # The stats did move (so the test distinguishes the two semantics) ...
    stats_after = {n: (m.running_mean.clone(), m.running_var.clone())
                   for n, m in model.named_modules() if n in names}
    literal = sum(r(n, stats_after) for n in names).detach()
    assert not torch.allclose(loss, literal, rtol=1e-4)
    # ... exactly as they do without hooks, and the train-mode logits are unchanged.
    with torch.no_grad():
        untouched_logits = untouched(image)
    torch.testing.assert_close(logits.detach(), untouched_logits, rtol=0, atol=0)
    for k, v in untouched.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_accumulates_over_forwards_until_read(resnet):
    model = copy.deepcopy(resnet).double()
    x1, x2 = _image(torch.float64, seed=1), _image(torch.float64, seed=2)
    bn_loss = BNStatAlignmentLoss(model, first_bn_multiplier=10.0)

    model(x1)
    l1, g1 = _loss_and_grad(bn_loss, x1)
    log1 = bn_loss.per_layer()
    model(x2)
    l2, g2 = _loss_and_grad(bn_loss, x2)
    log2 = bn_loss.per_layer()
    assert not torch.allclose(l1, l2)

    model(x1)
    model(x2)
    total = bn_loss()
    g1b, g2b = torch.autograd.grad(GRAD_SCALE * total, (x1, x2))
    torch.testing.assert_close(total.detach(), l1 + l2, rtol=1e-12, atol=0)
    torch.testing.assert_close(g1b, g1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g2b, g2, rtol=1e-12, atol=1e-15)
    # per_layer() holds the latest forward's values, detached.
    for n, v in bn_loss.per_layer().items():
        assert not v.requires_grad
        torch.testing.assert_close(v, log2[n], rtol=0, atol=0)
        assert not torch.equal(v, log1[n])
    # Reading cleared the accumulator.
    empty = bn_loss()
    assert empty.item() == 0.0 and not empty.requires_grad and empty.dtype == torch.float64
    bn_loss.remove()


def test_reset_and_enabled(resnet):
    model = copy.deepcopy(resnet)
    image = _image(torch.float32)
    bn_loss = BNStatAlignmentLoss(model)
    model(image)
    bn_loss.reset()
    assert bn_loss().item() == 0.0 and bn_loss.per_layer() == {}

    bn_loss.enabled = False
    model(image)
    assert bn_loss().item() == 0.0
    bn_loss.enabled = True
    model(image)
    assert bn_loss().item() > 0.0
    bn_loss.remove()


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()
            if isinstance(m, nn.BatchNorm2d)]


def test_remove_and_context_manager(resnet):
    model = copy.deepcopy(resnet)
    image = _image(torch.float32)
    assert all(c == (0, 0) for c in _hook_counts(model))

    bn_loss = BNStatAlignmentLoss(model)
    assert all(c == (1, 1) for c in _hook_counts(model))
    model(image)
    bn_loss.remove()
    assert all(c == (0, 0) for c in _hook_counts(model))
    assert bn_loss().item() > 0.0  # what ran before remove() is still readable ...
    model(image)
    after = bn_loss()               # ... but nothing is added after it
    assert after.item() == 0.0 and not after.requires_grad
    bn_loss.remove()  # idempotent

    with BNStatAlignmentLoss(model, layers=["bn1", "layer1.0.bn2"]) as ctx_loss:
        counts = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
                  if isinstance(m, nn.BatchNorm2d)}
        assert counts["bn1"] == (1, 1) and counts["layer1.0.bn2"] == (1, 1) and counts["layer1.0.bn1"] == (0, 0)
        model(image)
        assert ctx_loss().item() > 0.0
    assert all(c == (0, 0) for c in _hook_counts(model))
    model(image)
    assert ctx_loss().item() == 0.0

    # Dropping the loss object removes its hooks too (they hold only a weak reference).
    BNStatAlignmentLoss(model)
    gc.collect()
    assert all(c == (0, 0) for c in _hook_counts(model))


def test_autocast_bf16(resnet):
    model = copy.deepcopy(resnet)
    image = _image(torch.float32)
    seen = []
    probe = model.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    with BNStatAlignmentLoss(model, first_bn_multiplier=10.0) as bn_loss:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(image)
            loss = bn_loss()
        (grad,) = torch.autograd.grad(GRAD_SCALE * loss, image)
        model(image)
        loss32 = bn_loss()
    probe.remove()
    assert seen == [torch.bfloat16, torch.float32]  # the hooked BN input really was bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # bf16 convolutions change the statistics by bf16 rounding only.
    torch.testing.assert_close(loss.detach(), loss32.detach(), rtol=5e-2, atol=0)


def test_state_dict_does_not_hold_the_classifier(resnet):
    model = copy.deepcopy(resnet)
    bn_loss = BNStatAlignmentLoss(model)
    assert bn_loss.state_dict() == {}
    assert list(bn_loss.parameters()) == [] and list(bn_loss.buffers()) == []
    assert list(bn_loss.children()) == []
    assert bn_loss.model is model
    bn_loss.to(torch.float64)  # moving the loss does not touch the classifier
    assert model.bn1.running_mean.dtype == torch.float32 and model.conv1.weight.dtype == torch.float32
    assert "layers=20" in repr(bn_loss) and "hooked=True" in repr(bn_loss)
    bn_loss.remove()


def test_other_batchnorm_kinds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(7, 5, dtype=torch.float32, requires_grad=True)
    with BNStatAlignmentLoss(model, form="squared", first_bn_multiplier=2.0) as bn_loss:
        model(x)
        loss = bn_loss()
    h = model[0](x)
    expected = 2.0 * ((h.mean(0) - model[1].running_mean).pow(2).sum()
                      + (h.var(0, unbiased=False) - model[1].running_var).pow(2).sum())
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_rejects_model_without_batchnorm():
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'model' must contain at least one BatchNorm.*"
                                         r"got a Sequential with none"):
        BNStatAlignmentLoss(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(TypeError, match=r"BNStatAlignmentLoss: 'model' must be an nn.Module.*got function"):
        BNStatAlignmentLoss(lambda x: x)


def test_rejects_bad_layers(resnet):
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'layers' entry 'layer9.bn1' is not a module of "
                                         r"the model; BatchNorm layers are: \['bn1'"):
        BNStatAlignmentLoss(resnet, layers=["bn1", "layer9.bn1"])
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'layers' entry 'conv1' must be a BatchNorm "
                                         r"layer \(_BatchNorm\), got Conv2d"):
        BNStatAlignmentLoss(resnet, layers=["conv1"])
    with pytest.raises(TypeError, match=r"BNStatAlignmentLoss: 'layers' must be a list of module names, got str"):
        BNStatAlignmentLoss(resnet, layers="bn1")
    with pytest.raises(ValueError, match=r"'layers' must name at least one BatchNorm layer, got an empty list"):
        BNStatAlignmentLoss(resnet, layers=[])
    with pytest.raises(ValueError, match=r"'layers' must name each layer once, got duplicates \['bn1'\]"):
        BNStatAlignmentLoss(resnet, layers=["bn1", "layer1.0.bn1", "bn1"])
    # A failed construction leaves no hooks behind.
    assert all(c == (0, 0) for c in _hook_counts(resnet))


def test_rejects_bad_weights_and_options(resnet):
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'layer_weights' must have one weight per chosen "
                                         r"layer \(20\), got 3"):
        BNStatAlignmentLoss(resnet, layer_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'layer_weights' keys must be chosen layers, got "
                                         r"unknown names \['layer1.0.bn2'\]"):
        BNStatAlignmentLoss(resnet, layers=["bn1"], layer_weights={"layer1.0.bn2": 2.0})
    with pytest.raises(TypeError, match=r"'layer_weights'\[1\] must be a number, got str"):
        BNStatAlignmentLoss(resnet, layers=["bn1", "layer1.0.bn1"], layer_weights=[1.0, "2"])
    with pytest.raises(ValueError, match=r"first_bn_multiplier must be finite, got nan"):
        BNStatAlignmentLoss(resnet, first_bn_multiplier=float("nan"))
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: 'form' must be one of 'unsquared', 'squared', "
                                         r"got 'l1'"):
        BNStatAlignmentLoss(resnet, form="l1")
    assert all(c == (0, 0) for c in _hook_counts(resnet))


def test_rejects_layers_without_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"BNStatAlignmentLoss: the chosen BatchNorm layers must have running "
                                         r"statistics.*track_running_stats=False: \['3'\]; pass 'layers'"):
        BNStatAlignmentLoss(model)
    with pytest.raises(ValueError, match=r"track_running_stats=False: \['3'\]$"):
        BNStatAlignmentLoss(model, layers=["1", "3"])
    with BNStatAlignmentLoss(model.eval(), layers=["1"]) as bn_loss:  # leaving it out works
        model(torch.randn(2, 3, 6, 6))
        assert bn_loss().item() > 0


def test_bn_stats_loss_rejects_targets_of_wrong_length():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"ddg.bn_stats_loss: 'target_mean' must be a floating \[C\] = \[4\] "
                                         r"tensor on cpu .*got torch.float32 \(3,\)"):
        ddg_ops.bn_stats_loss(x, torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match=r"'target_var' must be a floating \[C\] = \[4\].*got torch.float32 \(4, 1\)"):
        ddg_ops.bn_stats_loss(x, torch.zeros(4), torch.ones(4, 1))


# --------------------------------------------------------------------------------------------
# sync=True across 2 CPU processes (gloo)
# --------------------------------------------------------------------------------------------
SPLITS = {"halves": (3, 3), "uneven": (4, 2)}


def _small_model():
    torch.manual_seed(123)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _sync_worker(rank, world, tmpdir, ext_loaded):
    assert ddg_ops.EXTENSION.loaded == ext_loaded, "the spawned process must use the same ddg_ops path"
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        data = torch.load(os.path.join(tmpdir, "inputs.pt"))
        out = {}
        for split, sizes in SPLITS.items():
            lo = sum(sizes[:rank])
            for form in ("unsquared", "squared"):
                x = data["x"][lo:lo + sizes[rank]].clone().requires_grad_(True)
                res = ddg_ops.bn_stats_loss(x, data["m"], data["v"], form=form, weight=0.7, sync=True)
                (grad,) = torch.autograd.grad(GRAD_SCALE * res.loss, x)
                out[split, form] = (res.loss.detach(), res.mean.detach(), res.var.detach(), grad)

                model = _small_model()
                image = data["image"][lo:lo + sizes[rank]].clone().requires_grad_(True)
                with BNStatAlignmentLoss(model, form=form, first_bn_multiplier=10.0, sync=True) as bn_loss:
                    model(image)
                    loss = bn_loss()
                (igrad,) = torch.autograd.grad(GRAD_SCALE * loss, image)
                out[split, form, "module"] = (loss.detach(), igrad)
        torch.save(out, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_across_two_processes(tmp_path):
    torch.manual_seed(5)
    x = torch.randn(6, 4, 5, 3)
    x[3:] += 0.8  # different per-rank means: the merge's between-rank term matters
    data = {"x": x, "m": torch.randn(4) * 0.3, "v": torch.rand(4) + 0.5,
            "image": torch.randn(6, 3, 6, 6) * 1.3 + torch.linspace(-0.5, 0.5, 6).view(6, 1, 1, 1)}
    torch.save(data, tmp_path / "inputs.pt")
    env_before = os.environ.get("DDG_DISABLE_EXT")
    mp.spawn(_sync_worker, args=(2, str(tmp_path), ddg_ops.EXTENSION.loaded), nprocs=2, join=True)
    assert os.environ.get("DDG_DISABLE_EXT") == env_before
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    tol = dict(rtol=1e-5, atol=1e-6)
    for split, sizes in SPLITS.items():
        bounds = [(0, sizes[0]), (sizes[0], sizes[0] + sizes[1])]
        for form in ("unsquared", "squared"):
            xf = data["x"].clone().requires_grad_(True)
            full = ddg_ops.bn_stats_loss(xf, data["m"], data["v"], form=form, weight=0.7)
            (gfull,) = torch.autograd.grad(GRAD_SCALE * full.loss, xf)
            model = _small_model()
            image = data["image"].clone().requires_grad_(True)
            with BNStatAlignmentLoss(model, form=form, first_bn_multiplier=10.0) as bn_loss:
                model(image)
                mloss = bn_loss()
            (mgrad,) = torch.autograd.grad(GRAD_SCALE * mloss, image)
            for rank, (lo, hi) in enumerate(bounds):
                loss, mean, var, grad = ranks[rank][split, form]
                torch.testing.assert_close(loss, full.loss.detach(), **tol)
                torch.testing.assert_close(mean, full.mean, **tol)
                torch.testing.assert_close(var, full.var, **tol)
                torch.testing.assert_close(grad, gfull[lo:hi], **tol)
                loss, igrad = ranks[rank][split, form, "module"]
                torch.testing.assert_close(loss, mloss.detach(), **tol)
                torch.testing.assert_close(igrad, mgrad[lo:hi], **tol)
            # Not trivially equal to the rank-local loss.
            local = ddg_ops.bn_stats_loss(data["x"][:sizes[0]], data["m"], data["v"], form=form, weight=0.7)
            assert not torch.allclose(local.loss, full.loss, rtol=1e-3)
