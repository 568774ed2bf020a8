"""Image generation and editing metrics: L1, feature cosine (CLIP-I, DINO), FID.

Feature models are pluggable: any callable `images -> (N, D) features` works. Real weights load
from a local path only (`load_feature_extractor`); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import linalg

FeatureExtractor = Callable[[Sequence[np.ndarray]], np.ndarray]


def to_float_image(image: np.ndarray | Image.Image, name: str = "image") -> np.ndarray:
    """HxWx3 float64 in [0, 1] from a PIL image, uint8 array or float array in [0, 1]."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be HxWx3, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    out = arr.astype(np.float64)
    if out.size and (out.min() < 0.0 or out.max() > 1.0):
        raise ValueError(f"{name}: float images must lie in [0, 1]")
    return out


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of a [0, 1] float image to (width, height)."""
    pil = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    return np.asarray(pil.resize(size, Image.BICUBIC)).astype(np.float64) / 255.0


def l1_distance(pred_images: Sequence, target_images: Sequence) -> np.ndarray:
    """Per-item mean absolute pixel difference in [0, 1] (the editing "L1"); a prediction of
    another size is resized to its target first."""
    if len(pred_images) != len(target_images):
        raise ValueError(
            f"pred_images ({len(pred_images)}) and target_images ({len(target_images)}) differ in length"
        )
    out = np.zeros(len(pred_images))
    for i, (p, t) in enumerate(zip(pred_images, target_images, strict=True)):
        pf = to_float_image(p, f"pred_images[{i}]")
        tf = to_float_image(t, f"target_images[{i}]")
        if pf.shape != tf.shape:
            pf = resize_image(pf, (tf.shape[1], tf.shape[0]))
        out[i] = np.abs(pf - tf).mean()
    return out


def feature_cosine(pred_features: np.ndarray, ref_features: np.ndarray) -> np.ndarray:
    """Per-item cosine similarity of paired feature rows (CLIP-I / DINO score)."""
    a = np.asarray(pred_features, dtype=np.float64)
    b = np.asarray(ref_features, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"features must be paired (N, D) arrays, got {a.shape} and {b.shape}")
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    den = na * nb
    return np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1.0), 0.0)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the FID between two Gaussians.

    When the product is near-singular, `eps` is added to both diagonals (as the common FID
    implementations do); a small imaginary part from sqrtm is dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {s1.shape}, sigma2 {s2.shape}"
        )
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary part: {np.abs(covmean.imag).max()}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (e.g. Inception pool features of generated vs real)."""
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


class ProjectionExtractor:
    """A torch-free extractor: resize to `size`, flatten, project by a fixed matrix.

    For tests and smoke runs (saved as .npz with `weight` (size*size*3, D), `bias` (D,), `size`);
    it makes FID/CLIP-I plumbing testable without real weights.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, size: int) -> None:
        if weight.shape[0] != size * size * 3 or bias.shape != (weight.shape[1],):
            raise ValueError(f"weight {weight.shape} / bias {bias.shape} do not fit size={size}")
        self.weight, self.bias, self.size = weight, bias, int(size)

    def __call__(self, images: Sequence) -> np.ndarray:
        rows = [
            resize_image(to_float_image(im, f"images[{i}]"), (self.size, self.size)).reshape(-1)
            for i, im in enumerate(images)
        ]
        return np.stack(rows) @ self.weight + self.bias if rows else np.zeros((0, self.bias.size))

    @classmethod
    def random(cls, size: int = 8, dim: int = 16, seed: int = 0) -> ProjectionExtractor:
        rng = np.random.default_rng(seed)
        weight = rng.standard_normal((size * size * 3, dim)) / np.sqrt(size * size * 3)
        return cls(weight, rng.standard_normal(dim) * 0.01, size)

    def save(self, path: str | os.PathLike[str]) -> None:
        np.savez(path, weight=self.weight, bias=self.bias, size=np.array(self.size))


class TorchScriptExtractor:
    """A TorchScript feature model from a local file (e.g. an exported Inception or CLIP image
    tower): input float NCHW in [0, 1] at `size`x`size`, output (N, D). torch is imported lazily."""

    def __init__(self, path: Path, size: int, device: str = "cpu") -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"loading {path} needs torch: install setok-eval[torch] or pass a callable"
            ) from exc
        self._torch = torch
        self.module = torch.jit.load(str(path), map_location=device).eval()
        self.size, self.device = int(size), device

    def __call__(self, images: Sequence) -> np.ndarray:
        torch = self._torch
        batch = np.stack(
            [resize_image(to_float_image(im), (self.size, self.size)) for im in images]
        ).transpose(0, 3, 1, 2)
        with torch.no_grad():
            out = self.module(torch.from_numpy(batch).float().to(self.device))
        return out.reshape(len(images), -1).double().cpu().numpy()


def load_feature_extractor(
    path: str | os.PathLike[str] | None, *, kind: str = "features", size: int = 224
) -> FeatureExtractor:
    """Load a feature model from a local file: `.npz` (ProjectionExtractor) or TorchScript
    (`.pt`/`.pth`/`.ts`). Raises FileNotFoundError naming `path` and `kind` when missing."""
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"{kind} feature extractor: argument 'path' = {path!r} is not a file. Weights are "
            f"never downloaded: export the model (e.g. Inception for FID, CLIP/DINO image tower) "
            f"to a local .pt TorchScript or .npz file and pass its path, or pass a callable."
        )
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as data:
            return ProjectionExtractor(data["weight"], data["bias"], int(data["size"]))
    if p.suffix in (".pt", ".pth", ".ts"):
        return TorchScriptExtractor(p, size=size)
    raise ValueError(f"{kind} feature extractor: unsupported file type {p.suffix!r} for path {p}")
