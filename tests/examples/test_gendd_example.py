"""examples/gendd: one training step of stage 1 and stage 2 (gradient routing), the beta2 ramp, LR schedules,
weight-decay groups, exact resume, the evaluation path and a short run of the tiny preset end to end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

for _module in ("accelerate", "sklearn", "matplotlib", "tqdm"):  # the 'models' extra
    pytest.importorskip(_module)

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.common.runlog import read_csv  # noqa: E402
from examples.gendd import data, models  # noqa: E402
from examples.gendd.evaluate import GenDDLogits, evaluate_gendd  # noqa: E402
from examples.gendd.models import TinyCNN  # noqa: E402
from examples.gendd.optim import EpochLR, beta2_at, build_optimizer, named_ln, param_groups  # noqa: E402
from examples.gendd.presets import CIFAR_STAGE2, IMAGENET_STAGE1, PRESETS, StageConfig, _imagenet_stage2  # noqa: E402
from examples.gendd.method import (GenDDModel, Stage1Model, build_gendd_loss, gendd_loss,  # noqa: E402
                                   load_stage1_backbone, stage1_loss, teacher_outputs)
from examples.gendd.pipeline import RunConfig, Stage, StopRun, run_stage, start_run  # noqa: E402

K = 10
SMALL = PRESETS["tiny"].with_overrides(token_size=8, head_width=32, head_depth=2, batch_mul=2, eval_steps=3,
                                       eval_samples=1)  # teacher D_T = 16 -> N = 2 tokens of 8


pytestmark = pytest.mark.usefixtures("one_thread", "restore_determinism")


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def tiny_pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = models.freeze(TinyCNN((8, 16), K))
    student = TinyCNN((4, 8), K)
    return teacher, student


def stage2_model(seed: int = 0, perturb_head: bool = True):
    teacher, student = tiny_pair(seed)
    model = GenDDModel(student, build_gendd_loss(SMALL, student, teacher))
    if perturb_head:  # the adaLN / output layers start at zero: no gradient reaches z before they move
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in (model.gendd.head.adaln, model.gendd.head.final_linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
    return teacher, student, model


def batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, K, (n,), generator=g)


def backbone_params(student):
    return [p for n, p in student.named_parameters() if not n.startswith("fc.")]


# ------------------------------------------------------------------------------------------- one step

def test_stage1_step_trains_backbone_and_projection_only():
    teacher, student = tiny_pair()
    model = Stage1Model(student, teacher)
    assert isinstance(model.proj, nn.Linear) and model.proj.in_features == 8 and model.proj.out_features == 16
    assert torch.equal(model.teacher_fc.weight, teacher.fc.weight)
    loss, metrics = stage1_loss(model.train(), batch())
    assert torch.isfinite(loss) and set(metrics) >= {"loss", "ce", "train_acc"}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone_params(student))
    assert model.proj.weight.grad is not None and model.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in student.fc.parameters())             # the student's fc is unused
    assert all(p.grad is None for p in model.teacher_fc.parameters())       # frozen teacher classifier
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not model.teacher_fc.training


def test_stage2_step_routes_gradients():
    teacher, student, model = stage2_model()
    x, y = batch()
    loss, metrics = gendd_loss(model.train(), teacher, (x, y))
    assert torch.isfinite(loss) and set(metrics) >= {"loss", "diff", "mse", "vb", "ce", "train_acc"}
    assert torch.allclose(loss, metrics["diff"] + metrics["ce"])

    f_t, _ = teacher_outputs(teacher, x)
    out, logits = model(x, f_t, y)
    head = list(model.gendd.head.parameters())
    norm = list(model.gendd.cond_norm.parameters())
    out.loss.backward(retain_graph=True)  # the diffusion loss: backbone, cond_norm and head; never the fc
    assert all(p.grad is not None for p in backbone_params(student) + head + norm)
    assert sum(float(p.grad.abs().sum()) for p in backbone_params(student)) > 0
    assert all(p.grad is None for p in student.fc.parameters())
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits, y).backward()  # the probe CE: the student's fc only
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.fc.parameters())
    assert all(p.grad is None for p in backbone_params(student) + head + norm)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # the contraction prototypes are the teacher classifier rows
    assert torch.equal(model.gendd.prototypes, teacher.fc.weight)


def test_stage2_loads_stage1_backbone_non_strictly():
    teacher, student = tiny_pair()
    stage1 = Stage1Model(student, teacher)
    fresh = TinyCNN((4, 8), K)
    info = load_stage1_backbone(fresh, stage1.state_dict())
    assert info["missing"] == [] and info["unexpected"] == []
    assert any(k.startswith("proj.") for k in info["dropped"])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), student.state_dict().values()))


# ------------------------------------------------------------------------------------------- optimiser

def test_beta2_schedule():
    assert beta2_at(0, 100, 0.95, 0.999) == pytest.approx(0.95)
    assert beta2_at(100, 100, 0.95, 0.999) == pytest.approx(0.999)
    assert beta2_at(50, 100, 0.95, 0.999) == pytest.approx((0.95 + 0.999) / 2)
    for s in (0, 13, 77):
        expected = 0.999 - 0.5 * (0.999 - 0.96) * (1 + torch.cos(torch.tensor(torch.pi * s / 77.0)).item())
        assert beta2_at(s, 77, 0.96, 0.999) == pytest.approx(expected)
    values = [beta2_at(s, 50, 0.95, 0.999) for s in range(51)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_weight_decay_groups():
    _, student, model = stage2_model(perturb_head=False)
    model.ln = nn.LayerNorm(3)  # a parameter named like 'ln' is exempt, as in the original
    cfg = CIFAR_STAGE2
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    exempt = {id(p) for p in groups["no_decay"]["params"]}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert exempt == {id(p) for p in model.gendd.head.parameters()} | {id(p) for p in model.ln.parameters()}
    assert {id(p) for p in model.gendd.cond_norm.parameters()} <= decayed  # cond_norm keeps weight decay
    assert {id(p) for p in student.parameters()} <= decayed
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 5e-2
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["betas"] == (0.9, 0.95) for g in optimizer.param_groups)
    for name in ("ln.weight", "blocks.0.ln1.bias", "ln_f.weight", "encoder.ln.bias"):
        assert named_ln(name), name
    for name in ("layer1.0.bn1.weight", "kernel.weight", "fc.bias", "cond_norm.weight"):
        assert not named_ln(name), name


def test_lr_schedules():
    step = EpochLR(CIFAR_STAGE2)  # warmup 50, x0.1 after 150 / 180 / 210 (1-based epochs)
    assert step(0) == pytest.approx(1 / 50) and step(48) == pytest.approx(49 / 50) and step(49) == 1.0
    assert step(149) == 1.0 and step(150) == pytest.approx(0.1) and step(180) == pytest.approx(0.01)
    assert step(239) == pytest.approx(1e-3)
    cos = EpochLR(_imagenet_stage2(10))  # warmup (e+1)/10, cosine to min_lr at the last epoch
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(99) == pytest.approx(1e-6 / 2e-3)
    assert EpochLR(IMAGENET_STAGE1)(0) < 1.0


# ------------------------------------------------------------------------------------------- resume

def _resume_run(out: Path, accelerator, max_steps=None, resume=False, init_seed=0):
    from accelerate.utils import set_seed

    set_seed(init_seed)
    teacher, _ = tiny_pair(0)  # the frozen teacher is not in the checkpoint: the same one each time
    torch.manual_seed(init_seed)
    student = TinyCNN((4, 8), K)
    # R = 40: M = 16 x 2 x 40 = 1280 rows > 1000 timesteps, so the head gathers the time MLP and the
    # conditions (the index backward whose multi-threaded CPU kernel is racy without deterministic mode)
    preset = SMALL.with_overrides(batch_mul=40)
    model = GenDDModel(student, build_gendd_loss(preset, student, teacher))
    train, test = data.digits(limit=96)
    train_loader = data.train_loader(train, 16, seed=0)
    cfg = StageConfig(epochs=3, lr=2e-3, weight_decay=5e-2, schedule="step", warmup_epochs=1, milestones=(2,),
                      beta2_min=0.95)

    def evaluate(m, epoch, final):  # sampling evaluation in the loop must not disturb the training RNG
        return evaluate_gendd(m, teacher.fc, test, num_steps=3, cfg_scale=2.0, num_samples=1, batch_size=16,
                              max_batches=1)

    rc = RunConfig(preset=preset, out=out, resume=resume, max_steps=max_steps, quiet=True)
    run = start_run(rc, accelerator, "resume test")
    stage = Stage("gendd", model, cfg, lambda m, b, g: gendd_loss(m, teacher, b, g), evaluate, train_loader)
    try:
        run_stage(run, stage)
    except StopRun:
        pass
    return model, run


@pytest.fixture
def two_deterministic_threads():
    """The CLI's CPU setting (deterministic kernels) with two threads, where racy kernels would show."""
    from examples.gendd.train import configure_determinism

    threads, before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    configure_determinism(True, cuda=False)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(before)


def test_resume_is_bit_identical(tmp_path, accelerator, two_deterministic_threads):
    straight, run_a = _resume_run(tmp_path / "a", accelerator)
    _, partial = _resume_run(tmp_path / "b", accelerator, max_steps=12)  # 6 steps per epoch: stop after epoch 2
    assert partial.step == 12 and "gendd" not in partial.products and len(partial.log.rows) == 2
    torch.manual_seed(1234)  # a different RNG state and initialisation before resuming: the checkpoint wins
    resumed, run_b = _resume_run(tmp_path / "b", accelerator, resume=True, init_seed=7)
    assert "gendd" in run_a.products and "gendd" in run_b.products and run_a.step == run_b.step == 18
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    opt_a, opt_b = (torch.load(tmp_path / d / "checkpoints" / "step-00000018" / "gendd" / "optimizer.bin",
                               weights_only=False) for d in ("a", "b"))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and opt_a["state"]
    for i in opt_a["state"]:
        for key, value in opt_a["state"][i].items():
            assert torch.equal(value, opt_b["state"][i][key]), (i, key)
    sched_a, sched_b = (torch.load(tmp_path / d / "checkpoints" / "step-00000018" / "rng-rank0.pt",
                                   weights_only=False)["rank_state"]["scheduler"] for d in ("a", "b"))
    assert sched_a == sched_b
    # beta2 after the last of 18 steps: the end of the ramp
    assert opt_a["param_groups"][0]["betas"][1] == pytest.approx(beta2_at(17, 17, 0.95, 0.999))
    strip = [{k: v for k, v in r.items() if k != "epoch_s"} for r in run_a.log.rows]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_s"} for r in run_b.log.rows]
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text() == "step-00000018"


# ------------------------------------------------------------------------------------------- evaluation

def test_evaluation_outputs(accelerator):
    teacher, student, model = stage2_model()
    model.eval()
    x, y = batch(5)
    out = GenDDLogits(model, teacher.fc, num_steps=3, cfg_scale=2.0, num_samples=2, seed=0)(x)
    assert set(out) == {"acc_probe", "acc_sample", "acc_sample_skip"}
    assert all(v.shape == (5, K) and torch.isfinite(v).all() for v in out.values())
    generated = model.gendd.sample(models.features(student, x), num_samples=2, num_steps=3)
    assert generated.shape == (5, 16)
    head = model.gendd.head
    skipped = head.sampling_schedule(20, skip_clipped_step=True)
    full = head.sampling_schedule(20)
    assert full.num_timesteps == 20 and skipped.num_timesteps == 19  # the t = 999 step is left out
    assert torch.equal(skipped.timestep_map, full.timestep_map[:-1]) and int(full.timestep_map.max()) == 999
    assert torch.allclose(skipped.alphas_cumprod, full.alphas_cumprod[:-1])
    _, test = data.digits(limit=12)
    acc = evaluate_gendd(model, teacher.fc, test, num_steps=3, cfg_scale=2.0, num_samples=1, batch_size=6,
                         max_batches=1)
    assert set(acc) == {"acc_probe", "acc_sample", "acc_sample_skip"}
    assert all(0.0 <= v <= 100.0 for v in acc.values())
    # the sampling noise of a chunk is seeded by (seed, chunk): the same numbers again, another seed differs
    fn = GenDDLogits(model, teacher.fc, num_steps=3, cfg_scale=2.0, num_samples=2, seed=0)
    assert torch.equal(fn(x, 3)["acc_sample"], fn(x, 3)["acc_sample"])
    assert not torch.equal(fn(x, 3)["acc_sample"], fn(x, 4)["acc_sample"])


def test_evaluation_does_not_depend_on_the_process_count():
    """Rank r of w evaluates chunks r, r + w, ...: the per-rank counts of two ranks sum to one process'."""
    from examples.gendd.evaluate import accuracies

    teacher, student, model = stage2_model()
    model.eval()
    _, test = data.digits(limit=40)  # chunks of 7, the last one shorter
    fn = GenDDLogits(model, teacher.fc, num_steps=3, cfg_scale=2.0, num_samples=1, seed=5)

    class Rank:  # what accuracies reads of an accelerator; the sum over ranks is done below
        def __init__(self, r):
            self.process_index, self.num_processes, self.is_local_main_process = r, 2, r == 0

        def reduce(self, t, op):
            return t

        device = torch.device("cpu")

    one = accuracies(fn, fn.names, test, 7, torch.device("cpu"))
    halves = [accuracies(fn, fn.names, test, 7, torch.device("cpu"), Rank(r)) for r in (0, 1)]
    from examples.common.sharded_eval import rank_chunks
    assert len(test) % 7 and [rank_chunks(test, 7, r, 2)[0] for r in (0, 1)] == [[0, 2, 4], [1, 3, 5]]
    sizes = [sum(len(b) for b in rank_chunks(test, 7, r, 2)[1].batch_sampler) for r in (0, 1)]
    assert sum(sizes) == len(test)
    for name in fn.names:
        assert one[name] * len(test) == pytest.approx(sum(h[name] * n for h, n in zip(halves, sizes))), name


def test_missing_dataset_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-root"):
        data.cifar100(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--data-root"):
        data.imagenet(str(tmp_path))


# ------------------------------------------------------------------------------------------- tiny preset

TINY_SHORT = ["--preset", "tiny", "--epochs", "1", "--probe-epochs", "1", "--steps-per-epoch", "2", "--eval-steps",
              "3", "--eval-samples", "1", "--eval-batches", "1", "--quiet"]


def test_tiny_preset_short_run(tmp_path):
    from examples.gendd.export import evaluate_export, load_gendd
    from examples.gendd.train import main

    out = tmp_path / "tiny"
    results = main(TINY_SHORT + ["--out", str(out)])
    for name in ("results.json", "results.md", "log.csv", "curves.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = read_csv(out / "log.csv")
    assert {r["stage"] for r in rows} == {"teacher", "ce", "kd", "gendd", "gendd_probe"}
    gendd = [r for r in rows if r["stage"] == "gendd"][-1]
    assert all(isinstance(gendd[k], float) for k in ("loss", "mse", "vb", "ce", "lr", "beta2", "acc_sample",
                                                      "acc_sample_skip", "acc_probe"))
    table = (out / "results.md").read_text()
    assert "KD" in table and "sampling" in table and "linear probe" in table
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["per_seed"]["0"]) >= {"teacher", "ce", "kd", "gendd_sample", "gendd_probe"}
    assert saved["metrics"]["seed0_gendd_sample"] == saved["per_seed"]["0"]["gendd_sample"]
    assert all(isinstance(v, float) for v in saved["metrics"].values())
    # the exported GenDD student (its fc from the probe stage) reproduces the run's last evaluation
    exported = load_gendd(out / "export" / "seed0")
    assert exported.info["measured"]["acc_probe"] == saved["per_seed"]["0"]["gendd_probe_stage"]
    assert evaluate_export(exported, data.digits()[1]) == exported.info["measured"]
    # resuming a finished run retrains nothing and reports the same accuracies
    again = main(TINY_SHORT + ["--out", str(out), "--resume"])
    assert again["per_seed"] == results["per_seed"]


def test_distill_pipeline_stages_on_stand_in_data(tmp_path, monkeypatch, accelerator):
    """run_distill (the CIFAR/ImageNet path) end to end: stage 1 -> stage 2 -> probe, with small CNNs and
    random 3x8x8 images standing in for the zoo models and the dataset; then stage 2 alone from the
    stage-1 run's checkpoint (--from-checkpoint)."""
    from examples.gendd import pipeline

    monkeypatch.setattr(models, "load", lambda name, path, k: TinyCNN((8, 16), k, in_channels=3))
    monkeypatch.setattr(models, "build", lambda name, k: TinyCNN((4, 8), k, in_channels=3))
    g = torch.Generator().manual_seed(0)
    fake = [torch.utils.data.TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, K, (n,), generator=g))
            for n in (32, 16)]
    monkeypatch.setattr(data, "datasets_for", lambda *a, **kw: tuple(fake))
    one = StageConfig(epochs=1, lr=1e-3, weight_decay=5e-2)
    preset = PRESETS["res56_res20"].with_overrides(
        num_classes=K, batch_size=8, token_size=8, head_width=32, batch_mul=2, eval_steps=3, eval_samples=1,
        num_workers=0, stage1=one, stage2=replace_cfg(one, beta2_min=0.95), probe=replace_cfg(PRESETS["tiny"].probe,
                                                                                              epochs=1))
    out, teacher_ckpt = tmp_path / "distill", tmp_path / "teacher.pth"
    teacher_ckpt.write_bytes(b"")  # read by the patched models.load, which ignores it
    rc = pipeline.RunConfig(preset=preset, out=out, stages=("stage1", "stage2", "probe"),
                            teacher_ckpt=str(teacher_ckpt), quiet=True)
    results = pipeline.run_distill(rc, accelerator)
    assert {"teacher_acc", "stage1_acc", "stage2_acc_sample", "stage2_acc_probe", "probe_acc_probe"} <= set(
        results["metrics"])
    assert {r["stage"] for r in read_csv(out / "log.csv")} == {"stage1", "stage2", "probe"}
    assert (out / "curves.png").is_file() and (out / "export" / "head" / "config.json").is_file()
    rc2 = pipeline.RunConfig(preset=preset, out=tmp_path / "from_stage1", stages=("stage2",),
                             teacher_ckpt=str(teacher_ckpt), from_checkpoint=str(out / "checkpoints"),
                             quiet=True)
    assert "stage2_acc_sample" in pipeline.run_distill(rc2, accelerator)["metrics"]
    # the probe alone, on the student of the first run's stage 2: its export records that stage 2's evaluation
    rc3 = pipeline.RunConfig(preset=preset, out=tmp_path / "probe_only", stages=("probe",),
                             teacher_ckpt=str(teacher_ckpt), from_checkpoint=str(out / "checkpoints"), quiet=True)
    probe_only = pipeline.run_distill(rc3, accelerator)["metrics"]
    measured = json.loads((tmp_path / "probe_only" / "export" / "gendd.json").read_text())["measured"]
    assert measured == {"acc_sample": results["metrics"]["stage2_acc_sample"],
                        "acc_sample_skip": results["metrics"]["stage2_acc_sample_skip"],
                        "acc_probe": probe_only["probe_acc_probe"]}


def replace_cfg(cfg, **changes):
    from dataclasses import replace
    return replace(cfg, **changes)


def test_distill_pipeline_with_zoo_classifiers(tmp_path, monkeypatch, accelerator):
    """The CIFAR path with the classifier zoo: a resnet20 teacher checkpoint loaded from disk, a resnet8
    student, one step per stage on random 3x32x32 images."""
    from ddg_models import classifiers
    from examples.gendd import pipeline

    torch.manual_seed(0)
    path = tmp_path / "resnet20.pth"
    torch.save({"model": classifiers.build_classifier("resnet20", K).state_dict()}, path)
    g = torch.Generator().manual_seed(0)
    fake = [torch.utils.data.TensorDataset(torch.rand(n, 3, 32, 32, generator=g),
                                           torch.randint(0, K, (n,), generator=g)) for n in (16, 8)]
    monkeypatch.setattr(data, "datasets_for", lambda *a, **kw: tuple(fake))
    one = StageConfig(epochs=1, lr=1e-3, weight_decay=5e-2)
    preset = PRESETS["res56_res20"].with_overrides(
        teacher="resnet20", student="resnet8", num_classes=K, batch_size=8, head_width=32, batch_mul=2,
        eval_steps=3, eval_samples=1, num_workers=0, stage1=one, stage2=replace_cfg(one, beta2_min=0.95),
        probe=replace_cfg(PRESETS["tiny"].probe, epochs=1))
    rc = pipeline.RunConfig(preset=preset, out=tmp_path / "zoo", stages=("stage1", "stage2", "probe"),
                            teacher_ckpt=str(path), steps_per_epoch=1, eval_batches=1, quiet=True)
    metrics = pipeline.run_distill(rc, accelerator)["metrics"]
    assert all(isinstance(metrics[k], float) for k in ("teacher_acc", "stage1_acc", "stage2_acc_sample",
                                                       "stage2_acc_probe", "probe_acc_probe"))


# ------------------------------------------------------------------------------------------- smoke presets

def test_smoke_fixtures_are_the_real_layouts(tmp_path):
    """The smoke presets' files are what a user's real data and teachers look like on disk, read by the
    loaders a real run uses; they are the same bytes every time and reused once complete."""
    import pickle

    from torchvision import datasets
    from torchvision.models import resnet34

    from ddg_models.classifiers import load_classifier
    from examples.gendd import smoke

    cifar_root, cifar_teacher = smoke.build("smoke_cifar", tmp_path / "a")
    pickles = Path(cifar_root) / "cifar-100-python"
    entry = pickle.load(open(pickles / "train", "rb"), encoding="latin1")
    assert entry["data"].dtype.name == "uint8" and entry["data"].shape == (64, 3072)
    assert {"fine_labels", "coarse_labels", "filenames", "batch_label"} <= set(entry)
    with pytest.raises(RuntimeError, match="corrupted"):  # torchvision's stock reader wants the archive's md5
        datasets.CIFAR100(cifar_root, train=True, download=False)
    train, test = data.cifar100(cifar_root)
    assert len(train) == 64 and len(test) == 32 and len(train.classes) == 100
    assert train[0][0].shape == (3, 32, 32) and max(train.targets) < PRESETS["smoke_cifar"].num_classes
    saved = torch.load(cifar_teacher, weights_only=True)  # RepDistiller's ckpt_epoch_240.pth format
    assert set(saved) == {"epoch", "model", "accuracy", "optimizer"} and saved["epoch"] == 240
    assert load_classifier("resnet56", cifar_teacher).fc.out_features == PRESETS["smoke_cifar"].num_classes

    image_root, image_teacher = smoke.build("smoke", tmp_path / "a")
    train, test = data.imagenet(image_root, image_size=PRESETS["smoke"].image_size)
    assert train.classes == list(smoke.IMAGENET_WNIDS) and len(train) == 32 and len(test) == 16
    assert test[0][0].shape == (3, 32, 32) and Path(train.samples[0][0]).suffix == ".JPEG"
    state = torch.load(image_teacher, weights_only=True)  # a plain state dict, as torchvision's weight files
    resnet34(num_classes=PRESETS["smoke"].num_classes).load_state_dict(state)
    assert load_classifier("resnet34", image_teacher).fc.out_features == PRESETS["smoke"].num_classes

    stamp = (pickles / "train").stat().st_mtime_ns
    assert smoke.build("smoke_cifar", tmp_path / "a") == (cifar_root, cifar_teacher)
    assert (pickles / "train").stat().st_mtime_ns == stamp  # reused, not rewritten
    again, _ = smoke.build("smoke_cifar", tmp_path / "b")
    for name in ("train", "test", "meta"):
        assert (Path(again) / "cifar-100-python" / name).read_bytes() == (pickles / name).read_bytes()
    other = torch.load(smoke.build("smoke", tmp_path / "b")[1], weights_only=True)
    assert all(torch.equal(v, other[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="no fixtures for preset 'tiny'"):
        smoke.build("tiny", tmp_path)


def test_smoke_cifar_preset_run(tmp_path):
    """--preset smoke_cifar: res56_res20's path (RepDistiller checkpoint, CIFAR-100 pickles, stage 1 and GenDD
    stage 2); its export reloads and gives the run's last evaluation."""
    from examples.gendd import smoke
    from examples.gendd.export import evaluate_export, load_gendd
    from examples.gendd.train import main

    out = tmp_path / "cifar"
    results = main(["--preset", "smoke_cifar", "--quiet", "--out", str(out)])
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics == results["metrics"] and all(isinstance(v, float) for v in metrics.values())
    assert {"teacher_acc", "stage1_acc", "stage2_acc_sample", "stage2_acc_sample_skip", "stage2_acc_probe",
            "stage2_loss", "stage2_diff"} <= set(metrics)
    assert [r["stage"] for r in read_csv(out / "log.csv")] == ["stage1", "stage2", "stage2"]
    exported = load_gendd(out / "export")
    assert exported.info["measured"] == {k: metrics[f"stage2_{k}"] for k in ("acc_sample", "acc_sample_skip",
                                                                             "acc_probe")}
    _, test = data.cifar100(smoke.build("smoke_cifar", out)[0])
    assert evaluate_export(exported, test) == exported.info["measured"]


@pytest.mark.parametrize("smoke, paper", [("smoke", "r34_r18"), ("smoke_cifar", "res56_res20")])
def test_smoke_presets_are_the_paper_presets_cut(smoke, paper):
    """Only the listed cuts differ from the paper preset: same models, dataset kind, stages, loss settings and
    optimisers (the epochs shortened with the schedules' shapes rescaled)."""
    from examples.gendd.presets import rescale

    cut = {"name", "num_classes", "batch_size", "image_size", "eval_batch_size", "head_width", "eval_steps",
           "eval_samples", "val_samples", "val_every", "num_workers", "stage1", "stage2", "probe"}
    s, p = PRESETS[smoke].to_dict(), PRESETS[paper].to_dict()
    assert {k for k in s if s[k] != p[k]} <= cut
    assert {k: s[k] for k in s if k not in cut} == {k: p[k] for k in p if k not in cut}
    for stage in ("stage1", "stage2", "probe"):
        mine, theirs = getattr(PRESETS[smoke], stage), getattr(PRESETS[paper], stage)
        assert mine.epochs < theirs.epochs and mine == rescale(theirs, mine.epochs)  # the optimiser, lr, wd, ...
