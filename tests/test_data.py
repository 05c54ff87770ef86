"""Images, whitening and the deterministic patch set."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

from qsae.data import (
    BLOCK,
    BUILTIN_IMAGES,
    DataSpec,
    check_patches_match,
    extract_patches,
    load_images,
    patch_sigma,
    sample_patches,
    shard_ranges,
    whiten,
)
from qsae.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def images():
    return load_images()


def test_builtin_images_load_offline():
    raw = load_images(whiten=False)
    assert len(raw) == len(BUILTIN_IMAGES) == 10
    for img in raw:
        assert img.ndim == 2 and img.dtype == np.float64 and min(img.shape) >= 300
        assert np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


def test_whitening_flattens_the_spectrum():
    img = load_images(whiten=False)[0]  # camera: a 1/f² power spectrum
    w = whiten(img)
    assert w.std() == pytest.approx(1.0)

    def band_power(x, lo, hi):
        P = np.abs(np.fft.fft2(x - x.mean())) ** 2
        f = np.hypot(*np.meshgrid(np.fft.fftfreq(x.shape[0]), np.fft.fftfreq(x.shape[1]), indexing="ij"))
        return P[(f >= lo) & (f < hi)].mean()

    raw_ratio = band_power(img, 0.01, 0.03) / band_power(img, 0.15, 0.25)
    white_ratio = band_power(w, 0.01, 0.03) / band_power(w, 0.15, 0.25)
    assert raw_ratio > 50 and white_ratio < raw_ratio / 50  # low frequencies no longer dominate


def test_patches_are_normalised(images):
    X = sample_patches(images, 5000, seed=1)
    assert X.shape == (5000, 64) and X.dtype == np.float64 and X.flags.c_contiguous
    assert X.min() >= 0.1 and X.max() <= 0.9
    assert abs(X.mean() - 0.5) < 0.01


def test_same_seed_same_patches_other_seed_other_patches(images):
    a = sample_patches(images, 1000, seed=5)
    assert np.array_equal(a, sample_patches(images, 1000, seed=5))
    assert not np.array_equal(a, sample_patches(images, 1000, seed=6))


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 1), (BLOCK - 1, BLOCK + 1), (BLOCK, 2 * BLOCK), (123, 9000), (9999, 10000),
                                    (10000, 10000)])
def test_any_range_equals_the_slice_bit_for_bit(images, lo, hi):
    full = sample_patches(images, 10000, seed=2)
    assert np.array_equal(sample_patches(images, 10000, seed=2, lo=lo, hi=hi), full[lo:hi])


def test_rows_do_not_depend_on_m(images):
    small = sample_patches(images, 1000, seed=2)
    big = sample_patches(images, 50000, seed=2, lo=0, hi=1000)
    assert np.array_equal(small, big)


def test_a_range_is_built_alone(images, monkeypatch):
    import qsae.data as data

    blocks = []
    real = data._positions
    monkeypatch.setattr(data, "_positions", lambda s, seed, p, k: (blocks.append(k), real(s, seed, p, k))[1])
    sigma = patch_sigma(images, 8, 0)
    blocks.clear()
    X = sample_patches(images, 20_000_000, lo=10_000_000, hi=10_000_010, sigma=sigma)
    assert X.shape == (10, 64)
    assert blocks == [10_000_000 // BLOCK]  # one block generated, not 2442


def test_sigma_is_fixed_by_the_reference_sample(images):
    assert patch_sigma(images, 8, 3) == patch_sigma(images, 8, 3)
    # a range far from the reference sample is normalised with the same σ
    X = sample_patches(images, 100_000, seed=3, lo=90_000, hi=90_100)
    Y = sample_patches(images, 100_000, seed=3, lo=90_000, hi=90_100, sigma=patch_sigma(images, 8, 3))
    assert np.array_equal(X, Y)


def test_loaders(tmp_path, images):
    stack = np.stack([img[:64, :64] for img in images[:3]])
    scipy.io.savemat(tmp_path / "IMAGES.mat", {"IMAGES": np.moveaxis(stack, 0, -1)})
    from_mat = load_images(tmp_path / "IMAGES.mat")
    assert len(from_mat) == 3 and np.allclose(from_mat[1], stack[1])  # .mat is taken as already whitened
    np.save(tmp_path / "s.npy", stack)
    assert np.array_equal(load_images(tmp_path / "s.npy")[2], stack[2])
    np.savez(tmp_path / "s.npz", images=stack)
    assert np.array_equal(load_images(tmp_path / "s.npz")[0], stack[0])
    import matplotlib.image

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        matplotlib.image.imsave(folder / f"{i}.png", np.random.default_rng(i).random((40, 50)), cmap="gray")
    pngs = load_images(folder, whiten=False)
    assert len(pngs) == 2 and pngs[0].shape == (40, 50)


def test_bad_inputs_name_the_problem(tmp_path, images):
    with pytest.raises(DataError, match="no such file.*nothere.mat"):
        load_images(tmp_path / "nothere.mat")
    scipy.io.savemat(tmp_path / "x.mat", {"PICS": np.zeros((4, 4))})
    with pytest.raises(DataError, match=r"no variable IMAGES \(it has \['PICS'\]\)"):
        load_images(tmp_path / "x.mat")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_images(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_images(tmp_path / "empty")
    with pytest.raises(DataError, match="image 1 is 5×40, smaller than the 8×8 patch"):
        sample_patches([np.zeros((20, 20)), np.zeros((5, 40))], 10)
    bad = np.zeros((20, 20))
    bad[3, 4] = np.nan
    bad[5, 5] = np.inf
    with pytest.raises(DataError, match="image 0 has 2 NaN or Inf"):
        sample_patches([bad], 10)
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(DataError, match="nan.npy: image 0 has 2 NaN"):
        load_images(tmp_path / "nan.npy")
    for m in (0, -5):
        with pytest.raises(DataError, match=f"m={m}"):
            sample_patches(images, m)
    with pytest.raises(DataError, match="rows 5..3"):
        sample_patches(images, 10, lo=5, hi=3)
    with pytest.raises(ConfigError, match="patch_size 7 gives 49 inputs but the model has n_visible=64; use --patch-size 8"):
        check_patches_match(7, 64)


def test_shard_ranges():
    assert shard_ranges(1001, [1, 1, 1]) == [(0, 334), (334, 667), (667, 1001)]
    r = shard_ranges(100, [3, 1])
    assert r == [(0, 75), (75, 100)]
    assert all(hi > lo for lo, hi in shard_ranges(8, [1] * 8))
    with pytest.raises(ConfigError, match="positive"):
        shard_ranges(10, [1, 0])
    with pytest.raises(ConfigError):
        shard_ranges(10, [])


def test_dataspec_round_trip(images):
    spec = DataSpec(m=300, seed=4)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert np.array_equal(spec.build(10, 20), sample_patches(images, 300, seed=4)[10:20])


# ---------------------------------------------------------------------------- dtype


def test_float32_patches_are_the_float64_ones_rounded_once(images):
    X64 = sample_patches(images, 3000, seed=7, lo=100, hi=2100)
    X32 = sample_patches(images, 3000, seed=7, lo=100, hi=2100, dtype="float32")
    assert X32.dtype == np.float32 and X32.flags.c_contiguous and X32.shape == X64.shape
    assert np.array_equal(X32, X64.astype(np.float32))
    assert np.array_equal(sample_patches(images, 3000, seed=7, dtype=np.float32), sample_patches(images, 3000, seed=7).astype(np.float32))
    spec = DataSpec(m=500, seed=2)
    assert np.array_equal(spec.build(0, 50, dtype=np.float32), spec.build(0, 50).astype(np.float32))
    assert spec.build(dtype="float64").dtype == np.float64


@pytest.mark.parametrize("dtype", ["float16", np.int32, "complex128", "banana", object])
def test_other_dtypes_are_refused_naming_the_two(images, dtype):
    with pytest.raises(ConfigError, match="float32 or float64"):
        sample_patches(images, 10, dtype=dtype)
    with pytest.raises(ConfigError, match="float32 or float64"):
        extract_patches(images[0], dtype=dtype)


def test_dataspec_sigma_is_the_sets_sigma(images):
    assert DataSpec(seed=3).sigma() == patch_sigma(images, 8, 3)
    assert DataSpec(seed=3, patch_size=6).sigma() == patch_sigma(images, 6, 3)
    assert DataSpec(seed=3).sigma() != DataSpec(seed=4).sigma()


# ---------------------------------------------------------------------------- unreadable files


def test_random_bytes_png_names_the_file_not_a_plugin(tmp_path):
    import matplotlib.image

    folder = tmp_path / "imgs"
    folder.mkdir()
    matplotlib.image.imsave(folder / "a.png", np.random.default_rng(0).random((40, 50)), cmap="gray")
    (folder / "x.png").write_bytes(np.random.default_rng(1).bytes(4096))
    for source in (folder, folder / "x.png"):
        with pytest.raises(DataError, match=r"cannot read .*x\.png as a PNG image; expected a PNG or JPEG") as e:
            load_images(source)
        assert "pip install" not in str(e.value)
    assert len(load_images(folder / "a.png", whiten=False)) == 1  # one file is a source too


def test_truncated_or_foreign_arrays_name_the_file(tmp_path):
    stack = np.zeros((3, 20, 20))
    np.save(tmp_path / "t.npy", stack)
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:300])
    np.savez(tmp_path / "t.npz", images=stack)
    (tmp_path / "t.npz").write_bytes((tmp_path / "t.npz").read_bytes()[:300])
    (tmp_path / "r.npy").write_bytes(np.random.default_rng(2).bytes(500))
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    (tmp_path / "t.mat").write_bytes(np.random.default_rng(3).bytes(500))
    for name in ("t.npy", "t.npz", "r.npy", "s.npy"):
        with pytest.raises(DataError, match=rf"cannot read \S*{name} as a numeric .* expected np.save"):
            load_images(tmp_path / name)
    with pytest.raises(DataError, match=r"cannot read \S*t\.mat as a MATLAB file"):
        load_images(tmp_path / "t.mat")


# ---------------------------------------------------------------------------- patches of new images


def _textbook(patch: np.ndarray, sigma: float) -> np.ndarray:
    """UFLDL's normalisation of one patch, written out."""
    x = patch.ravel() - patch.mean()
    x = np.maximum(np.minimum(x, 3 * sigma), -3 * sigma) / (3 * sigma)
    return np.clip((x + 1) * 0.4 + 0.1, 0.1, 0.9)


def test_extract_patches_equals_the_training_patches_at_their_positions(images):
    """Every position of one image holds, row for row, the patches the data set drew there."""
    import qsae.data as data

    img = images[2]
    sigma = patch_sigma([img], 8, 5)
    every = extract_patches(img, stride=1, sigma=sigma)
    ncols = img.shape[1] - 8 + 1
    assert every.shape == ((img.shape[0] - 8 + 1) * ncols, 64)
    _, r, c = data._positions(np.array([img.shape]), 5, 8, 0)
    train = sample_patches([img], 300, seed=5)
    assert np.array_equal(every[r[:300] * ncols + c[:300]], train)


def test_extract_patches_grid_order_and_normalisation(images):
    img = images[0][:40, :52]
    P = extract_patches([img, img.T], patch_size=8, stride=6, sigma=0.7)
    rows, cols = (40 - 8) // 6 + 1, (52 - 8) // 6 + 1
    assert P.shape == (rows * cols + cols * rows, 64) and P.flags.c_contiguous
    for r, c in [(0, 0), (1, 3), (rows - 1, cols - 1)]:
        assert np.allclose(P[r * cols + c], _textbook(img[6 * r : 6 * r + 8, 6 * c : 6 * c + 8], 0.7), rtol=0, atol=1e-12)
    assert np.allclose(P[rows * cols + 2], _textbook(img.T[0:8, 12:20], 0.7), rtol=0, atol=1e-12)
    grid = extract_patches(img, sigma=0.7)  # default stride: non-overlapping
    assert grid.shape == ((40 // 8) * (52 // 8), 64)
    assert np.array_equal(extract_patches(img, sigma=0.7, dtype="float32"), grid.astype(np.float32))
    raw = extract_patches(img, normalize=False)
    assert np.array_equal(raw[1], img[0:8, 8:16].ravel())
    own = extract_patches(img)  # σ of these patches themselves
    assert np.array_equal(own, extract_patches(img, sigma=float((raw - raw.mean(1, keepdims=True)).std())))


def test_extract_patches_refuses_what_cannot_work(images):
    with pytest.raises(ConfigError, match="stride=0"):
        extract_patches(images[0], stride=0)
    with pytest.raises(DataError, match="smaller than the 8×8 patch"):
        extract_patches(np.zeros((5, 30)))
    with pytest.raises(DataError, match="patches are constant"):
        extract_patches(np.ones((16, 16)))
    with pytest.raises(DataError, match="NaN or Inf"):
        extract_patches(np.full((16, 16), np.nan), sigma=1.0)
