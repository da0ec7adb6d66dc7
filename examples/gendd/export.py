"""The trained GenDD model as a user loads it afterwards: ``<out>/export/`` (safetensors only).

* ``student.safetensors``: the student classifier's state dict, in the key layout of its builder
  (``ddg_models.classifiers``: torchvision's for the ImageNet ResNets, RepDistiller's for the CIFAR networks);
  its final ``fc`` is the last stage's (the stage-2 probe head, or the linear-probe stage's).
* ``cls_projector.safetensors``: the LayerNorm that turns the student's pooled feature into the head's
  condition (``GenDDLoss.cond_norm``; GenDD's ``cls_projector``).
* ``head/``: the ``SplitTokenDiffusionHead`` (``save_pretrained``: config.json + model.safetensors).
* ``teacher_classifier.safetensors``: the frozen teacher's final linear layer, which classifies the generated
  teacher features (sampling accuracy) and whose rows are the contraction's class prototypes.
* ``gendd.json``: the classifier name and class count of the student, GenDD's loss settings, the settings of
  the run's last evaluation (sampling steps, CFG scale, n_s, seed, chunk size) and what it measured
  (``measured``: acc_sample, acc_sample_skip, acc_probe): ``evaluate_export`` on the run's test set gives
  those numbers again.

``load_gendd(directory)`` rebuilds the model from these files alone (no teacher checkpoint is needed).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from ddg_losses import GenDDLoss
from ddg_models import SplitTokenDiffusionHead

from . import models
from .evaluate import evaluate_gendd
from .method import GenDDModel

FILES = ("student.safetensors", "cls_projector.safetensors", "head", "teacher_classifier.safetensors", "gendd.json")


@dataclass
class ExportedGenDD:
    """What ``load_gendd`` returns: the student + condition LayerNorm + head (``model``), the teacher's
    classifier and the settings of ``gendd.json``."""
    model: GenDDModel
    teacher_fc: nn.Linear
    info: Dict[str, Any]


def save_gendd(directory: Union[str, Path], model: GenDDModel, teacher_fc: nn.Linear, *, student: str,
               num_classes: int, evaluation: Dict[str, Any], measured: Dict[str, float]) -> Path:
    """Write ``model`` (an unwrapped ``GenDDModel``) and ``teacher_fc`` to ``directory`` (call it on one
    process). ``student``: the classifier name that builds the student; ``evaluation``: the keyword arguments of
    ``evaluate_gendd`` the run evaluated with (num_steps, cfg_scale, num_samples, seed, batch_size,
    max_batches); ``measured``: what that evaluation gave."""
    from safetensors.torch import save_file

    if not isinstance(model, GenDDModel):
        raise TypeError(f"save_gendd: 'model' must be a GenDDModel, got {type(model).__name__}")
    if not isinstance(teacher_fc, nn.Linear):
        raise TypeError(f"save_gendd: 'teacher_fc' must be an nn.Linear, got {type(teacher_fc).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}

    save_file(tensors(model.student), str(directory / "student.safetensors"))
    save_file(tensors(model.gendd.cond_norm), str(directory / "cls_projector.safetensors"))
    save_file(tensors(teacher_fc), str(directory / "teacher_classifier.safetensors"))
    model.gendd.head.save_pretrained(directory / "head")
    gendd = model.gendd
    info = {"student": student, "num_classes": int(num_classes), "contraction": gendd.contraction,
            "mix_beta": gendd.mix_beta, "cond_drop_prob": gendd.cond_drop_prob, "batch_mul": gendd.batch_mul,
            "evaluation": dict(evaluation), "measured": {k: float(v) for k, v in measured.items()}}
    (directory / "gendd.json").write_text(json.dumps(info, indent=2))
    return directory


def load_gendd(directory: Union[str, Path], device: Union[str, torch.device, None] = None) -> ExportedGenDD:
    """The model ``save_gendd`` wrote to ``directory``, in eval mode (fp32, on ``device``)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(f"load_gendd: {directory} lacks {missing} (a folder written by save_gendd is expected)")
    info = json.loads((directory / "gendd.json").read_text())
    student = models.build(info["student"], info["num_classes"])
    student.load_state_dict(load_file(str(directory / "student.safetensors")))
    fc_state = load_file(str(directory / "teacher_classifier.safetensors"))
    teacher_fc = nn.Linear(fc_state["weight"].shape[1], fc_state["weight"].shape[0])
    teacher_fc.load_state_dict(fc_state)
    head = SplitTokenDiffusionHead.from_pretrained(directory / "head", dtype=torch.float32)
    gendd = GenDDLoss(head, prototypes=teacher_fc.weight.detach(), contraction=info["contraction"],
                      mix_beta=info["mix_beta"], cond_drop_prob=info["cond_drop_prob"], batch_mul=info["batch_mul"])
    gendd.cond_norm.load_state_dict(load_file(str(directory / "cls_projector.safetensors")))
    model = GenDDModel(student, gendd).eval()
    if device is not None:
        model, teacher_fc = model.to(device), teacher_fc.to(device)
    return ExportedGenDD(model, teacher_fc.eval(), info)


def evaluate_export(exported: ExportedGenDD, dataset, accelerator=None, **overrides) -> Dict[str, float]:
    """The run's last evaluation of the exported model on ``dataset`` (the run's test set): the settings of
    ``gendd.json`` (``overrides`` replace them)."""
    settings: Dict[str, Optional[Any]] = {**exported.info["evaluation"], **overrides}
    return evaluate_gendd(exported.model, exported.teacher_fc, dataset, accelerator=accelerator, **settings)
