"""Sparse-autoencoder features against raw pixels on scikit-learn's 8×8 digits.

    python examples/digits_features.py                 # the README's table (about a minute)
    python examples/digits_features.py --hidden 100 --rho 0.1 --folds 3

Both pipelines scale the 64 pixels into [0.1, 0.9] (the sigmoid's comfortable range) and
end in the same LogisticRegression; one puts a SparseAutoencoder in between. Accuracy is
5-fold cross-validated (stratified, unshuffled: scikit-learn's default), the autoencoder
refitted on each training fold, so it never sees the fold it is scored on. Prints a
markdown table: accuracy mean ± std over the folds and the mean fit seconds per fold.

Needs scikit-learn (the test extra: pip install -e .[test]).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy: fold timings without BLAS threads competing
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def build_parser() -> argparse.ArgumentParser:
    """Options: the autoencoder's settings and the cross-validation (defaults: the README's run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, nargs="+", default=[30, 200], help="hidden units h (one row per value)")
    p.add_argument("--weight-decay", type=float, default=3e-5, help="λ")
    p.add_argument("--beta", type=float, default=3.0, help="sparsity weight β")
    p.add_argument("--rho", type=float, default=0.02, help="sparsity target ρ")
    p.add_argument("--iters", type=int, default=400, help="L-BFGS iterations")
    p.add_argument("--C", type=float, default=1.0, help="LogisticRegression's inverse regularisation, for both rows")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    p.add_argument("--seed", type=int, default=0, help="the autoencoder's random_state")
    return p


def main(argv: list[str] | None = None) -> None:
    """Cross-validate raw pixels and each autoencoder setting; print the table."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import cross_validate
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import MinMaxScaler
    except ImportError as e:
        raise SystemExit(f"this example needs scikit-learn: pip install scikit-learn ({e})")
    from qsae import SparseAutoencoder

    args = build_parser().parse_args(argv)
    X, y = load_digits(return_X_y=True)

    def classifier():
        return LogisticRegression(C=args.C, max_iter=5000)

    rows = [("raw pixels", make_pipeline(MinMaxScaler(feature_range=(0.1, 0.9)), classifier()))]
    for h in args.hidden:
        sae = SparseAutoencoder(n_hidden=h, weight_decay=args.weight_decay, sparsity_weight=args.beta,
                                sparsity_target=args.rho, max_iter=args.iters, random_state=args.seed)
        rows.append((f"SAE h={h}, λ={args.weight_decay:g}, β={args.beta:g}, ρ={args.rho:g}, {args.iters} it",
                     make_pipeline(MinMaxScaler(feature_range=(0.1, 0.9)), sae, classifier())))
    print(f"digits: {X.shape[0]} images of {X.shape[1]} pixels, {args.folds}-fold cross-validation, "
          f"LogisticRegression(C={args.C:g})\n")
    print("| features | accuracy | fit s / fold |")
    print("|---|---|---|")
    for name, pipe in rows:
        cv = cross_validate(pipe, X, y, cv=args.folds)
        acc, fit = cv["test_score"], cv["fit_time"]
        print(f"| {name} | {acc.mean():.4f} ± {acc.std():.4f} | {fit.mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()
