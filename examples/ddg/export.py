"""The exported student (``<out>/export/<run>/``): ``student.safetensors`` (backbone, projection, zero-shot head),
``student.json`` (backbone kind, classes, input normalisation) and, for a CLIP backbone, ``backbone/config.json``
(the vision tower's transformers config). ``load_student`` rebuilds it without the teachers or the training
folders: what a user loads afterwards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import torch

from ddg_models import CLIPVisionBackbone, DDGStudent, ZeroShotHead, build_backbone


def export_student(directory: Path, student: DDGStudent, backbone: str, class_names: Sequence[str],
                   preprocessing: Dict) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(directory / "student.safetensors"))
    if backbone == "clip_vit":
        student.backbone.model.config.save_pretrained(directory / "backbone")
    meta = {"backbone": backbone, "class_names": list(class_names), "embed_dim": student.embed_dim,
            "preprocessing": preprocessing}
    (directory / "student.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_student(directory: Path, device="cpu") -> DDGStudent:
    """The student of an export folder, in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "student.json").is_file():
        raise FileNotFoundError(f"load_student: {directory} has no student.json (expected an export folder "
                                "written by examples/ddg)")
    meta = json.loads((directory / "student.json").read_text())
    if meta["backbone"] == "clip_vit":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        backbone = CLIPVisionBackbone(CLIPVisionModelWithProjection(
            CLIPVisionConfig.from_pretrained(directory / "backbone")))
    else:
        backbone = build_backbone(meta["backbone"], None)  # the weights come from the export
    head = ZeroShotHead(torch.ones(len(meta["class_names"]), meta["embed_dim"]))
    student = DDGStudent(backbone, head)
    student.load_state_dict(load_file(str(directory / "student.safetensors")))
    return student.to(device).eval()
