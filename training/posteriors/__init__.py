"""Posterior approximations beyond MC dropout: variational, deep ensembles, SG-MCMC, Laplace.

What a checkpoint rebuilds and the server samples (each registers itself in
`training.model.MODEL_TYPES`):

    variational   Bayes-by-Backprop layers (Linear, Conv2d) and VariationalNet
    stacked       weight sets as stacked tensors: DeepEnsemble, SGLDSamples, SGHMCSamples
    laplace       LastLayerLaplace
    seeding       rows grouped by seed, for methods that draw whole weights per seed

How they are trained: `fit_variational`, `fit_ensemble` (also the MAP fit), `fit_sgmcmc`,
`fit_laplace` (+ `laplace_fit`, the curvature and evidence), on the shared `loop`;
`methods` adds them all to credence-train's table (`training.methods.METHODS`).
"""
