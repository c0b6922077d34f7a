"""Framework glue on top of the public API, imported only when used (the frameworks stay optional):
:mod:`pof_fast.integrations.lightning` (a callback for Lightning's automatic optimisation)."""
