"""Inception Score, FID, KID and precision/recall of a set of generated images against a set of real ones, from a
LOCAL Inception weights file: nothing is downloaded.

The Inception is torch-fidelity's port of the 2015-12-05 TensorFlow Inception (its TF-compatible resize
included), whose IS/FID/KID reproduce the TensorFlow reference numbers; IS, FID and KID are torch-fidelity's
formulas. Precision and recall are Kynkäänniemi et al. (NeurIPS 2019): a generated image counts as precise when
it lies within the k-th-nearest-neighbour radius of some real image, a real image counts as recalled likewise
within the generated set (k = 3), on the same 2048-d pool features.

Images are read from disk batch by batch (folders are searched recursively, so an ImageFolder tree of classes
works); only the features are kept (2048 + 1008 floats per image), so 100k images need about 1.2 GB, not the
images. ``extract_features`` saves a set's features to a file that later calls accept in place of the folder
(compute the real set's once). The weights file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
(from its GitHub releases), stored locally.

    python -m examples.common.image_set_metrics runs/ddis/imagenet/images /data/imagenet/val --resize 256 \\
        --inception-weights /weights/weights-inception-2015-12-05-6726825d.pth
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

METRICS = ("isc", "fid", "kid", "prc")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYERS = ("2048", "logits_unbiased")  # pool features (FID, KID, precision/recall), logits (IS)
Source = Union[str, Path]


def image_files(folder: Path) -> List[Path]:
    """The images under ``folder``, recursively, in a fixed (sorted) order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class _Images(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], resize: Optional[int]):
        self.files, self.resize = list(files), resize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        from torchvision.transforms import functional as TF
        img = Image.open(self.files[i]).convert("RGB")
        if self.resize:
            img = TF.center_crop(TF.resize(img, self.resize), self.resize)
        return TF.pil_to_tensor(img)  # uint8 [3, H, W]: the extractor resizes to 299 itself


def _stack(batch):
    sizes = {tuple(x.shape[1:]) for x in batch}
    if len(sizes) > 1:
        raise ValueError(f"image_set_metrics: the images of a set must share one size, got {sorted(sizes)[:3]}: "
                         "pass resize=N (shorter side to N, centre crop N x N)")
    return torch.stack(batch)


def load_inception(weights: Path, device: str = "cpu"):
    """torch-fidelity's Inception from a local weights file, returning the pool features and unbiased logits."""
    from torch_fidelity import FeatureExtractorInceptionV3
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"image_set_metrics: 'inception_weights' must be a local file (torch-fidelity's "
                                f"weights-inception-2015-12-05-6726825d.pth), got {weights}")
    return FeatureExtractorInceptionV3("inception-v3-compat", list(LAYERS),
                                       feature_extractor_weights_path=str(weights)).to(device).eval()


def extract_features(source: Source, *, inception_weights: Path, batch_size: int = 64, device: str = "cpu",
                     resize: Optional[int] = None, num_workers: int = 0, save_to: Optional[Path] = None,
                     quiet: bool = True) -> Dict[str, torch.Tensor]:
    """{"2048": [N, 2048], "logits_unbiased": [N, 1008]} (float64, CPU) of the images of folder ``source``, or
    the features saved earlier in file ``source``."""
    source = Path(source)
    if source.is_file():
        feats = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(feats, dict) or set(feats) != set(LAYERS):
            raise ValueError(f"image_set_metrics: {source} is not a features file of extract_features")
        return feats
    if not source.is_dir():
        raise FileNotFoundError(f"image_set_metrics: expected a folder of images or a features file, got {source}")
    files = image_files(source)
    if len(files) < 2:
        raise ValueError(f"image_set_metrics: {source} must hold at least 2 images "
                         f"({'/'.join(IMAGE_EXTENSIONS)}, searched recursively), found {len(files)}")
    from tqdm.auto import tqdm
    model = load_inception(inception_weights, device)
    loader = torch.utils.data.DataLoader(_Images(files, resize), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_stack)
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in LAYERS}
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"Inception features {source.name}", disable=quiet, unit="batch"):
            for name, f in zip(LAYERS, model(batch.to(device))):
                out[name].append(f.double().cpu())
    feats = {k: torch.cat(v) for k, v in out.items()}
    if save_to is not None:
        Path(save_to).parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, save_to)
    return feats


def knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of every row of ``x`` to its k-th nearest other row."""
    if x.shape[0] <= k:
        raise ValueError(f"image_set_metrics: precision/recall with k={k} need more than {k} images per set, "
                         f"got {x.shape[0]}")
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values  # +1: the row itself
                      for i in range(0, x.shape[0], chunk)])


def coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``points`` inside at least one ball (center, radius)."""
    inside = [(torch.cdist(points[i:i + chunk], centers) <= radii[None]).any(dim=1)
              for i in range(0, points.shape[0], chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3) -> Dict[str, float]:
    """Kynkäänniemi et al.'s improved precision and recall on feature rows."""
    precision = coverage(generated, real, knn_radii(real, k))
    recall = coverage(real, generated, knn_radii(generated, k))
    return {"precision": precision, "recall": recall}


def image_set_metrics(generated: Source, reference: Optional[Source] = None, *, inception_weights: Path,
                      metrics: Sequence[str] = ("isc", "fid", "prc"), batch_size: int = 64, device: str = "cpu",
                      resize: Optional[int] = None, isc_splits: int = 10, kid_subset_size: int = 1000,
                      prc_k: int = 3, quiet: bool = True) -> Dict[str, float]:
    """The requested ``metrics`` (``isc``: Inception Score of ``generated``; ``fid``, ``kid``, ``prc``: against
    ``reference``) as a flat dict: inception_score_mean/std, frechet_inception_distance,
    kernel_inception_distance_mean/std, precision, recall. ``generated`` / ``reference``: a folder of images or
    a features file of ``extract_features``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"image_set_metrics: 'metrics' must be a non-empty subset of {METRICS}, got {tuple(metrics)}")
    pairwise = [m for m in metrics if m != "isc"]
    if pairwise and reference is None:
        raise ValueError(f"image_set_metrics: {pairwise} compare two sets: pass 'reference'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"image_set_metrics: 'device' must be 'cpu' or 'cuda', got {device!r}")
    kw = dict(inception_weights=inception_weights, batch_size=batch_size, device=device, resize=resize, quiet=quiet)
    gen = extract_features(generated, **kw)
    if "isc" in metrics and gen["logits_unbiased"].shape[0] < isc_splits:
        raise ValueError(f"image_set_metrics: the Inception Score splits {gen['logits_unbiased'].shape[0]} images "
                         f"into isc_splits={isc_splits} parts: lower isc_splits or add images")
    found: Dict[str, float] = {}
    if "isc" in metrics:
        found.update(isc_features_to_metric(gen["logits_unbiased"], splits=isc_splits))
    if pairwise:
        ref = extract_features(reference, **kw)
        g, r = gen["2048"], ref["2048"]
        if "fid" in metrics:
            found.update(fid_statistics_to_metric(fid_features_to_statistics(g), fid_features_to_statistics(r),
                                                  verbose=False))
        if "kid" in metrics:
            size = min(kid_subset_size, g.shape[0], r.shape[0])
            found.update(kid_features_to_metric(g.float(), r.float(), kid_subset_size=size, verbose=False))
        if "prc" in metrics:
            found.update(precision_recall(g, r, prc_k))
    return {k: float(v) for k, v in found.items()}


def main(argv=None) -> Dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("generated", type=Path, help="folder of generated images (recursive) or a features file")
    parser.add_argument("reference", type=Path, nargs="?", help="folder of real images or a features file")
    parser.add_argument("--inception-weights", type=Path, required=True)
    parser.add_argument("--metrics", default="isc,fid,prc", help=f"comma list of {', '.join(METRICS)}")
    parser.add_argument("--resize", type=int, help="shorter side to N and centre crop N x N (sets of mixed sizes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--isc-splits", type=int, default=10)
    parser.add_argument("--save-reference-features", type=Path, help="store the reference set's features here")
    parser.add_argument("--out", type=Path, help="write the metrics to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.save_reference_features and args.reference is not None and args.reference.is_dir():
        if not args.save_reference_features.is_file():
            extract_features(args.reference, inception_weights=args.inception_weights, batch_size=args.batch_size,
                             device=args.device, resize=args.resize, save_to=args.save_reference_features,
                             quiet=args.quiet)
        args.reference = args.save_reference_features
    found = image_set_metrics(args.generated, args.reference, inception_weights=args.inception_weights,
                              metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
                              batch_size=args.batch_size, device=args.device, resize=args.resize,
                              isc_splits=args.isc_splits, quiet=args.quiet)
    text = json.dumps(found, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return found


if __name__ == "__main__":
    main()
