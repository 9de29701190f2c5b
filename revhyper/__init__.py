"""revhyper: exact hypergradients by running momentum SGD backwards.

Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
Learning", ICML 2015 (arXiv:1502.03492).
"""
