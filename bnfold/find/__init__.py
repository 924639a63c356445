"""The find stage: read a model's dataflow and pair each batch norm with a layer it folds
into, or say why not. Never changes a weight."""
