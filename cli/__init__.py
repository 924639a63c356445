"""The bnfold command line (installed as the ``bnfold_cli`` package)."""
