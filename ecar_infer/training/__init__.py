"""Training, data sets and quality evaluation. The sampling engine (ecar_infer) never imports this
subpackage: it brings data code, scikit-learn and matplotlib that a sampler does not need."""
