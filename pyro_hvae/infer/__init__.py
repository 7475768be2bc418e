"""Inference for hierarchies: the training objective (:mod:`.elbo`), how a training
step runs (:mod:`.step`), importance-weighted likelihoods (:mod:`.iw`) and their
diagnostics (:mod:`.diagnostics`)."""
