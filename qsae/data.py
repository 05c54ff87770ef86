"""Natural images, whitening, and the deterministic patch data set.

Images are 2-D float64 arrays. ``load_images()`` gives ten grey photographs shipped inside
scikit-image (no download), whitened as in Olshausen's sparsenet; other sources are
Olshausen's IMAGES.mat, .npy/.npz stacks and folders of PNG/JPEG.

``sample_patches(images, m, seed=s)`` is the data set: patch i is a pure function of
(images, seed, i, patch_size) — not of m — so any row range can be built alone and equals
the same rows of the whole set bit for bit. A worker cuts its own rows from the images.

Patch positions are drawn in blocks of ``BLOCK`` patches, block k from its own generator
``default_rng([seed, k])``; rows lo..hi touch only the blocks they fall in. Patches are
normalised as in UFLDL's sampleIMAGES: subtract each patch's mean, clip at ±3σ, rescale to
[0.1, 0.9]. σ is the standard deviation of the mean-subtracted pixels of a fixed reference
sample (the first ``SIGMA_SAMPLE`` patches of the same seed), so it does not depend on m or
on the range built. Patches are computed in float64 and cast at the end, so float32 patches
equal the float64 ones rounded once.

``extract_patches(images, sigma=σ)`` cuts patches from new images on a grid (or at every
position) and normalises them with the training set's σ, as model.npz records it, so a
trained model sees new images the way it saw its training data.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.typing import DTypeLike

from .errors import ConfigError, DataError

__all__ = [
    "BUILTIN_IMAGES",
    "DataSpec",
    "check_images",
    "source_files",
    "source_fingerprint",
    "check_patches_match",
    "extract_patches",
    "load_images",
    "patch_sigma",
    "sample_patches",
    "shard_ranges",
    "whiten",
]

BUILTIN_IMAGES = (
    "camera", "grass", "gravel", "brick", "moon",
    "astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle",
)
BLOCK = 4096  # patches per generator block: ranges cost O(hi − lo + BLOCK)
SIGMA_SAMPLE = 10_000  # patches in the reference sample that fixes σ
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DTYPES = ("float32", "float64")  # what patches can be made in


# ---------------------------------------------------------------------------- images


def _grey(img: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    img = img_as_float(np.asarray(img))
    if img.ndim == 3:
        img = rgb2gray(img[..., :3])
    return np.ascontiguousarray(img, dtype=np.float64)


def _builtin() -> list[np.ndarray]:
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - a declared dependency
        from .errors import MissingDependency

        raise MissingDependency("the built-in images need scikit-image: pip install scikit-image") from e
    images = []
    for name in BUILTIN_IMAGES:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        images.append(_grey(img))
    return images


def _from_mat(path: Path) -> list[np.ndarray]:
    from scipy.io import loadmat

    try:
        d = loadmat(path)
    except Exception as e:
        raise DataError(f"cannot read {path} as a MATLAB file ({e}); pass Olshausen's IMAGES.mat or a .npy stack") from e
    if "IMAGES" not in d:
        keys = sorted(k for k in d if not k.startswith("__"))
        raise DataError(f"{path} has no variable IMAGES (it has {keys}); pass Olshausen's IMAGES.mat, "
                        "whose IMAGES is (512, 512, 10)")
    a = np.asarray(d["IMAGES"], dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise DataError(f"{path}: IMAGES has shape {a.shape}; expected (height, width, k)")
    return [np.ascontiguousarray(a[:, :, i]) for i in range(a.shape[2])]


def _from_npy(path: Path) -> list[np.ndarray]:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if not z.files:
                    raise DataError(f"{path} holds no arrays; save the images with np.savez({path.name!r}, images=stack)")
                a = z["images"] if "images" in z.files else z[z.files[0]]
        else:
            a = np.load(path, allow_pickle=False)
        a = np.asarray(a, dtype=np.float64)
    except DataError:
        raise
    except Exception as e:  # truncated, not numpy at all, pickled objects, strings, ...
        raise DataError(f"cannot read {path} as a numeric {path.suffix} image stack ({type(e).__name__}: "
                        f"{_first_line(e)}); expected np.save/np.savez of a (k, height, width) float array") from e
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise DataError(f"{path}: array of shape {a.shape}; expected (k, height, width) or (height, width)")
    if a.shape[2] in (3, 4) and a.shape[0] > a.shape[2] and a.shape[1] > a.shape[2]:
        raise DataError(f"{path}: array of shape {a.shape} looks like one colour image (height, width, channels); "
                        "save grey images as (k, height, width), e.g. skimage.color.rgb2gray(image)[None]")
    return [np.ascontiguousarray(x) for x in a]


def _folder_files(path: Path) -> list[Path]:
    """The image files of a folder, in the order they are loaded (sorted by name)."""
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _from_folder(path: Path) -> list[np.ndarray]:
    files = _folder_files(path)
    if not files:
        raise DataError(f"{path} holds no PNG or JPEG images; put some there or pass another source")
    return [_read_image(p) for p in files]


def source_files(source: str | os.PathLike | None) -> list[Path]:
    """The files ``load_images(source)`` reads, in its order ([] for "builtin": scikit-image's)."""
    if source is None or str(source) == "builtin":
        return []
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"no such file or folder: {path}; pass a .mat/.npy/.npz file, a folder of PNG/JPEG, "
                        "or 'builtin'")
    return _folder_files(path) if path.is_dir() else [path]


def source_fingerprint(source: str | os.PathLike | None) -> str | None:
    """sha256 of the bytes of the files an image source reads, in load order (None for "builtin").

    Two sources with the same fingerprint give the same images, wherever they lie and whatever
    the files are called; a changed, added, removed or reordered image changes it. The files'
    bytes, not the decoded arrays: decoding and whitening may round differently elsewhere.
    """
    import hashlib

    files = source_files(source)
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.stat().st_size}\n".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def _read_image(path: Path) -> np.ndarray:
    """One PNG/JPEG file as a grey float64 image, or a DataError naming the file."""
    from skimage.io import imread

    try:
        img = imread(path)
    except Exception as e:  # imageio's own message suggests installing video plugins: not the fix here
        raise DataError(f"cannot read {path} as a {path.suffix.lstrip('.').upper()} image; expected a PNG or JPEG "
                        "picture (is the file truncated or something else renamed?); fix or remove it") from e
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.size == 0 or not np.issubdtype(img.dtype, np.number):
        raise DataError(f"{path} decodes to an array of shape {img.shape} ({img.dtype}); "
                        "expected a grey or colour picture (height, width[, channels])")
    return _grey(img)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"


def load_images(source: str | os.PathLike | None = "builtin", whiten: bool | None = None) -> list[np.ndarray]:
    """Load grey images as a list of 2-D float64 arrays.

    Parameters
    ----------
    source : "builtin" (or None) for the ten scikit-image photographs; otherwise a path to
        a .mat (key IMAGES, (H, W, k)), .npy/.npz ((k, H, W) or (H, W)), a folder of
        PNG/JPEG files (sorted by name), or one PNG/JPEG file.
    whiten : whiten with ``whiten()``. None: yes for photographs (builtin, folders), no for
        .mat/.npy/.npz, which are taken to be prepared already.
    """
    if source is None or str(source) == "builtin":
        images, photos = _builtin(), True
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"no such file or folder: {path}; pass a .mat/.npy/.npz file, "
                            "a folder of PNG/JPEG, or 'builtin'")
        if path.is_dir():
            images, photos = _from_folder(path), True
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            images, photos = [_read_image(path)], True
        elif path.suffix == ".mat":
            images, photos = _from_mat(path), False
        elif path.suffix in (".npy", ".npz"):
            images, photos = _from_npy(path), False
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .mat, .npy, .npz, a PNG/JPEG "
                            "or a folder of them")
        _check_images(images, 1, str(path))
    if whiten if whiten is not None else photos:
        images = [globals()["whiten"](img) for img in images]
        scale = 1.0 / np.sqrt(np.mean([img.var() for img in images]))  # unit variance over the set
        images = [img * scale for img in images]
    return images


def whiten(image: np.ndarray, f0_fraction: float = 0.8) -> np.ndarray:
    """Whiten one image as Olshausen's sparsenet does (unit variance).

    The spectrum is multiplied by f·exp(−(f/f0)⁴): the ramp f flattens the 1/f amplitude
    spectrum of natural images, the exponential rolls off before Nyquist to keep out the
    corners of the frequency square and aliasing. f0 = ``f0_fraction`` × Nyquist; the
    default 0.8 is sparsenet's code (f_0 = 0.4·N cycles per image, N the image size).
    """
    img = np.asarray(image, dtype=np.float64)
    _check_finite(img, "image")
    H, W = img.shape
    fy = np.fft.fftfreq(H)[:, None]  # cycles per pixel; Nyquist = 0.5
    fx = np.fft.rfftfreq(W)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f0 = f0_fraction * 0.5
    out = np.fft.irfft2(np.fft.rfft2(img - img.mean()) * (f * np.exp(-((f / f0) ** 4))), s=(H, W))
    return out / out.std()


# ---------------------------------------------------------------------------- patches


def _check_finite(img: np.ndarray, what: str) -> None:
    bad = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
    if bad:
        raise DataError(f"{what} has {bad} NaN or Inf pixels; clean or drop it")


def _check_images(images: Sequence[np.ndarray], patch_size: int, where: str = "images") -> None:
    if len(images) == 0:
        raise DataError(f"{where}: no images; pass at least one")
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.ndim != 2:
            raise DataError(f"{where}: image {i} has shape {img.shape}; images must be 2-D grey arrays")
        if min(img.shape) < patch_size:
            raise DataError(f"{where}: image {i} is {img.shape[0]}×{img.shape[1]}, smaller than the "
                            f"{patch_size}×{patch_size} patch; drop it or use a smaller --patch-size")
        _check_finite(img, f"{where}: image {i}")


def check_images(images: Sequence[np.ndarray], patch_size: int, where: str = "images") -> None:
    """Raise a DataError naming ``where``, the image and the fix unless every image is a finite
    2-D array at least ``patch_size`` on a side (the one check of every patch cutter)."""
    _check_images(images, patch_size, where)


def _positions(shapes: np.ndarray, seed: int, patch_size: int, k: int) -> tuple[np.ndarray, ...]:
    """Image index, row and column of the BLOCK patches of block k."""
    rng = np.random.default_rng([seed, k])
    img = rng.integers(0, len(shapes), size=BLOCK)  # each image equally likely, as sparsenet
    u = rng.random((2, BLOCK))
    span = shapes[img] - patch_size + 1  # valid top-left positions per axis
    r = (u[0] * span[:, 0]).astype(np.intp)
    c = (u[1] * span[:, 1]).astype(np.intp)
    return img, r, c


def _raw(images: Sequence[np.ndarray], patch_size: int, seed: int, lo: int, hi: int) -> np.ndarray:
    """Rows lo..hi of the unnormalised patch set, (hi − lo, patch_size²)."""
    shapes = np.array([img.shape for img in images])
    out = np.empty((hi - lo, patch_size * patch_size))
    off = np.arange(patch_size)
    for k in range(lo // BLOCK, -(-hi // BLOCK)):
        a, b = max(lo, k * BLOCK), min(hi, (k + 1) * BLOCK)
        img, r, c = (v[a - k * BLOCK : b - k * BLOCK] for v in _positions(shapes, seed, patch_size, k))
        for i in np.unique(img):  # one fancy-index per image, no loop over patches
            sel = np.flatnonzero(img == i)
            rows = r[sel, None, None] + off[None, :, None]
            cols = c[sel, None, None] + off[None, None, :]
            out[a - lo + sel] = images[i][rows, cols].reshape(len(sel), -1)
    return out


def _check_dtype(dtype) -> np.dtype:
    """np.float32 or np.float64 from any spelling of them; anything else is a ConfigError."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: patches can be float32 or float64; pass dtype='float32' "
                          "(half the memory) or dtype='float64' (the default)")
    return dt


def _normalize_(P: np.ndarray, sigma: float) -> np.ndarray:
    """UFLDL's normalisation in place: remove each row's mean, clip at ±3σ, map to [0.1, 0.9]."""
    if not (np.isfinite(sigma) and sigma > 0):
        raise DataError(f"σ = {sigma!r}: the patches are constant once their means are removed (1×1 patches, "
                        "or images without contrast), so nothing can be learned: use patches of 2×2 or more and images with "
                        "some contrast (a σ passed in must be a positive number)")
    s3 = 3.0 * sigma
    P -= P.mean(axis=1, keepdims=True)
    np.clip(P, -s3, s3, out=P)
    P *= 0.4 / s3  # [−3σ, 3σ] -> [0.1, 0.9]
    P += 0.5
    np.clip(P, 0.1, 0.9, out=P)  # rounding can step a hair outside
    return P


def patch_sigma(images: Sequence[np.ndarray], patch_size: int = 8, seed: int = 0) -> float:
    """σ of the mean-subtracted pixels of the reference sample (the first SIGMA_SAMPLE patches).

    The images are checked first (2-D, finite, at least patch_size on a side): a DataError
    naming the image and the fix, never an IndexError or a huge allocation."""
    if int(patch_size) != patch_size or patch_size < 1:
        raise ConfigError(f"patch_size={patch_size!r} must be a positive integer, e.g. 8")
    images = [np.asarray(img, dtype=np.float64) for img in images]
    _check_images(images, patch_size)
    P = _raw(images, patch_size, seed, 0, SIGMA_SAMPLE)
    P -= P.mean(axis=1, keepdims=True)
    return float(P.std())


def sample_patches(
    images: Sequence[np.ndarray],
    m: int,
    patch_size: int = 8,
    seed: int = 0,
    lo: int = 0,
    hi: int | None = None,
    normalize: bool = True,
    sigma: float | None = None,
    dtype: DTypeLike = np.float64,
) -> np.ndarray:
    """Rows lo..hi of the data set of m patches, (hi − lo, patch_size²), C-contiguous.

    Parameters
    ----------
    images : 2-D float64 arrays, each at least patch_size on a side.
    m : size of the data set (only bounds the range: patch i does not depend on m).
    patch_size : side of a square patch.
    seed : the data set's seed.
    lo, hi : the rows to build (default all m).
    normalize : UFLDL's normalisation to [0.1, 0.9] (needs σ: ``patch_sigma``).
    sigma : σ if already known (saves building the reference sample again).
    dtype : float64 (default) or float32. Computed in float64 either way and cast at the
        end, so the float32 patches are the float64 ones rounded once.
    """
    dt = _check_dtype(dtype)
    if int(m) != m or m <= 0:
        raise DataError(f"m={m!r} patches: need a positive integer, e.g. 10000")
    if int(patch_size) != patch_size or patch_size < 1:
        raise ConfigError(f"patch_size={patch_size!r} must be a positive integer, e.g. 8")
    hi = m if hi is None else hi
    if not 0 <= lo <= hi <= m:
        raise DataError(f"rows {lo}..{hi} are not a range of 0..{m}; need 0 <= lo <= hi <= m")
    images = [np.asarray(img, dtype=np.float64) for img in images]
    _check_images(images, patch_size)
    P = _raw(images, patch_size, seed, lo, hi)
    if normalize:
        _normalize_(P, patch_sigma(images, patch_size, seed) if sigma is None else float(sigma))
    return P if dt == np.float64 else P.astype(dt)


def extract_patches(
    images: np.ndarray | Sequence[np.ndarray],
    patch_size: int = 8,
    stride: int | None = None,
    sigma: float | None = None,
    normalize: bool = True,
    dtype: DTypeLike = np.float64,
) -> np.ndarray:
    """Patches of new images on a grid, normalised like the training patches.

    Parameters
    ----------
    images : one 2-D image or a sequence of them, prepared like the training images (for
        photographs: ``load_images(folder)``, which whitens them as the built-in ones).
    patch_size : side of a square patch (the model's n_visible = patch_size²).
    stride : step between patch corners, in both axes; None: ``patch_size`` (a grid of
        non-overlapping patches); 1: every position.
    sigma : σ of the training set (``SparseAutoencoder.sigma_``, model.npz's "sigma",
        ``DataSpec.sigma()``). None: σ of these patches themselves — only right when the
        new images are a training set of their own.
    normalize : UFLDL's normalisation (subtract each patch's mean, clip at ±3σ, rescale
        to [0.1, 0.9]), exactly as ``sample_patches`` does it.
    dtype : float64 (default) or float32 (computed in float64, cast at the end).

    Returns
    -------
    (k, patch_size²) C-contiguous array: image by image, and within an image the patch
    whose top-left corner is (r, c) at row ``(r // stride) · n_cols + c // stride`` with
    ``n_cols = (width − patch_size) // stride + 1``.
    """
    dt = _check_dtype(dtype)
    if int(patch_size) != patch_size or patch_size < 1:
        raise ConfigError(f"patch_size={patch_size!r} must be a positive integer, e.g. 8")
    stride = int(patch_size) if stride is None else stride
    if int(stride) != stride or stride < 1:
        raise ConfigError(f"stride={stride!r} must be a positive integer (1: every position; {patch_size}: a grid)")
    if isinstance(images, np.ndarray) and images.ndim == 2:
        images = [images]
    images = [np.asarray(img, dtype=np.float64) for img in images]
    _check_images(images, patch_size)
    windows = [np.lib.stride_tricks.sliding_window_view(img, (patch_size, patch_size))[::stride, ::stride]
               for img in images]
    P = np.concatenate([w.reshape(-1, patch_size * patch_size) for w in windows])  # a copy, C-contiguous
    if normalize:
        if sigma is None:
            sigma = float((P - P.mean(axis=1, keepdims=True)).std())
        _normalize_(P, float(sigma))
    return P if dt == np.float64 else P.astype(dt)


def check_patches_match(patch_size: int, n_visible: int) -> None:
    """Raise ConfigError unless patch_size² == n_visible."""
    if patch_size * patch_size != n_visible:
        side = int(round(np.sqrt(n_visible)))
        raise ConfigError(f"patch_size {patch_size} gives {patch_size * patch_size} inputs but the model has "
                          f"n_visible={n_visible}; use --patch-size {side} or n_visible={patch_size * patch_size}")


def shard_ranges(m: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Split rows 0..m into contiguous ranges proportional to ``weights`` (e.g. cores)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ConfigError(f"shard weights {list(weights)} must be positive and non-empty")
    cuts = np.rint(np.cumsum(w) / w.sum() * m).astype(int)
    bounds = [0, *cuts.tolist()]
    return [(bounds[i], bounds[i + 1]) for i in range(w.size)]


@dataclass(frozen=True)
class DataSpec:
    """How a data set is made, so it can be rebuilt anywhere (and saved in model.npz)."""

    source: str = "builtin"  # "builtin" or a path
    whiten: bool | None = None  # None: whiten photographs, not prepared arrays
    m: int = 10_000  # patches
    patch_size: int = 8  # side of a patch
    seed: int = 0  # patch positions
    fingerprint: str | None = None  # source_fingerprint(source): the same images, or a refusal (None: unchecked)

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSpec":
        """Inverse of ``to_dict``."""
        return cls(**d)

    @classmethod
    def of(cls, source: str | os.PathLike = "builtin", **fields) -> "DataSpec":
        """A spec whose source is an absolute path (found again from any folder) and which
        records the source's fingerprint (a resume finds the same images or refuses)."""
        if str(source) != "builtin":
            source = str(Path(source).expanduser().resolve())
        return cls(source=str(source), fingerprint=source_fingerprint(source), **fields)

    def check_source(self) -> None:
        """Raise a DataError unless the source holds the images this spec was made from."""
        if self.fingerprint is None:
            return
        now = source_fingerprint(self.source)
        if now != self.fingerprint:
            raise DataError(f"the images at {self.source} are not the ones this data set was made from (their "
                            f"files' fingerprint is {now}, the data set's {self.fingerprint}): restore them, or "
                            "point to where the original images are now")

    def images(self) -> list[np.ndarray]:
        """The prepared (loaded, maybe whitened) images; checked against the fingerprint."""
        self.check_source()
        return load_images(self.source, whiten=self.whiten)

    def build(self, lo: int = 0, hi: int | None = None, dtype: DTypeLike = np.float64) -> np.ndarray:
        """Rows lo..hi of the patches, float64 or float32."""
        return sample_patches(self.images(), self.m, patch_size=self.patch_size, seed=self.seed, lo=lo, hi=hi,
                              dtype=dtype)

    def sigma(self) -> float:
        """σ that normalises this data set (``patch_sigma`` of its images, patch size and seed).

        Training runs record it in model.npz so that ``extract_patches`` can normalise new
        images alike without the training images at hand.
        """
        return patch_sigma(self.images(), self.patch_size, self.seed)
