"""examples.common.image_set_metrics: from a local weights file and folders searched recursively, the metrics
equal a direct computation on the same Inception features (IS from the unbiased logits, FID with a float64 matrix
square root, precision/recall from brute-force k-NN radii); a set against itself has FID 0 and precision = recall
= 1; saved features stand in for a folder. The Inception is torch-fidelity's architecture with random weights
(nothing is downloaded)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")
pytest.importorskip("scipy")
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.common.image_set_metrics import image_set_metrics, main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
N = 8  # images per set (precision/recall with k = 3 need more than 3)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random (He-normal) weights, saved as its weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    cls = fe.FeatureExtractorInceptionV3
    with mock.patch.object(fe, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(cls, "load_state_dict", lambda self, state: None):
        torch.manual_seed(0)
        model = cls("inception-v3-compat", ["2048", "logits_unbiased"])
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(model.state_dict(), path)
    extractor = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path))
    return path, extractor.eval()


def write_set(folder: Path, seed: int, brightness: float):
    """N RGB images of 40x40 in two class subfolders (an ImageFolder tree)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(N):
        base = rng.uniform(0, 1, (1, 1, 3)) * brightness + rng.normal(0, 0.15, (40, 40, 3))
        img = (np.clip(base, 0, 1) * 255).astype(np.uint8)
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"class{i % 2}" / f"{i:03d}.png")
        images.append(img)
    return images


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return (root / "generated", write_set(root / "generated", 1, 0.6)), (root / "real", write_set(root / "real", 2, 1.0))


def features(extractor, images):
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        f2048, logits = extractor(x)
    return f2048.double().numpy(), logits.double()


def fid(a, b):
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def knn_radii(x, k):
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def covered(points, centers, radii):
    d = np.linalg.norm(points[:, None] - centers[None], axis=-1)
    return float((d <= radii[None]).any(axis=1).mean())


def test_metrics_equal_a_direct_computation(inception, sets):
    weights, extractor = inception
    (gen, gen_images), (real, real_images) = sets
    found = image_set_metrics(gen, real, inception_weights=weights, metrics=("isc", "fid", "prc", "kid"),
                              isc_splits=1, batch_size=4)
    fg, logits = features(extractor, gen_images)
    fr, _ = features(extractor, real_images)
    p = torch.softmax(logits, 1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()
    assert found["inception_score_mean"] == pytest.approx(float(kl.exp()), rel=1e-4)
    assert found["frechet_inception_distance"] == pytest.approx(fid(fg, fr), rel=1e-3)
    assert found["frechet_inception_distance"] > 1e-3  # the sets differ
    assert found["precision"] == pytest.approx(covered(fg, fr, knn_radii(fr, 3)))
    assert found["recall"] == pytest.approx(covered(fr, fg, knn_radii(fg, 3)))
    assert 0 < found["precision"] < 1 or 0 < found["recall"] < 1  # the radii decide something here
    assert np.isfinite(found["kernel_inception_distance_mean"])  # unbiased: may be < 0 on 8 images


def test_a_set_against_itself_and_saved_features(inception, sets, tmp_path):
    weights, _ = inception
    (gen, _), _ = sets
    out, feats = tmp_path / "m.json", tmp_path / "ref.pt"
    found = main([str(gen), str(gen), "--inception-weights", str(weights), "--metrics", "fid,prc", "--out", str(out),
                  "--save-reference-features", str(feats), "--quiet"])
    assert abs(found["frechet_inception_distance"]) < 1e-3
    assert found["precision"] == found["recall"] == 1.0
    assert json.loads(out.read_text()) == found and feats.is_file()
    again = image_set_metrics(feats, feats, inception_weights=weights, metrics=("fid", "prc"))
    assert again == found


def test_bad_inputs(tmp_path, inception, sets):
    weights, _ = inception
    (gen, _), _ = sets
    with pytest.raises(FileNotFoundError, match="'inception_weights' must be a local file"):
        image_set_metrics(gen, gen, inception_weights=tmp_path / "none.pth")
    with pytest.raises(ValueError, match=r"\['fid', 'prc'\] compare two sets: pass 'reference'"):
        image_set_metrics(gen, inception_weights=weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty must hold at least 2 images"):
        image_set_metrics(gen, tmp_path / "empty", inception_weights=weights, metrics=("fid",))
    (tmp_path / "mixed").mkdir()
    for i, size in enumerate((40, 40, 30)):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(tmp_path / "mixed" / f"{i}.png")
    with pytest.raises(ValueError, match="must share one size.*pass resize=N"):
        image_set_metrics(tmp_path / "mixed", inception_weights=weights, metrics=("isc",), isc_splits=1)
    with pytest.raises(ValueError, match="isc_splits=10 parts"):
        image_set_metrics(gen, inception_weights=weights, metrics=("isc",))
    with pytest.raises(ValueError, match="'metrics' must be a non-empty subset"):
        image_set_metrics(gen, gen, inception_weights=weights, metrics=("fjd",))
