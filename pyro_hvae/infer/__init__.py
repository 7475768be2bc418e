"""Inference for hierarchies: the training objective (:mod:`.elbo`), how a training
step runs (:mod:`.step`) and draws its posterior noise per data row (:mod:`.noise`),
importance-weighted likelihoods (:mod:`.iw`) and their diagnostics (:mod:`.diagnostics`)."""
