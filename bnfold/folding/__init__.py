"""The fold stage: the fold math (float64, tensors in and out) and the surgery that applies
a plan to (a copy of) the model."""
