"""The search benchmark library: one PoF line search per backend, side by side with three baselines.

For every case of SPEC section 5 (:mod:`.cases`) and every available backend that handles the device,
:mod:`.suite` times one full search as users call it (``pof_fast.line_search``: head gradient, direction
logits and the line search; with ``validate=False``, as the baselines check nothing either: the NaN/label
checks cost one host synchronisation, which ``benchmarks/step.py`` includes) for ``method="bracket_grid"``
with the reference script's settings (raw direction, init 1, max 100, 16 partitions) and for
``method="newton"`` (normalized). The modules, one job each:

- :mod:`.cases`: the sizes, the synthetic search batch and the searches timed;
- :mod:`.baselines`: ``script`` (the authors' loop), ``eager`` (the same search vectorised in eager
  PyTorch) and ``compile`` (that under ``torch.compile``), defined here and nowhere else;
- :mod:`.floors`: SPEC section 4's floor of a backend's bracket_grid search;
- :mod:`.graphs`: on CUDA, the whole search captured once in a CUDA graph and replayed;
- :mod:`.timing` and :mod:`.memory`: seconds per call and peak extra memory of one call;
- :mod:`.agreement`: each row's t* scored on the script's line in float64;
- :mod:`.targets`: the speed-up, floor and memory targets, judged on the rows;
- :mod:`.environment`, :mod:`.report`, :mod:`.plot`: machine and versions, the printed table, the chart;
- :mod:`.suite`: runs all of it per case and writes the JSON.

``pof-fast bench`` (:mod:`pof_fast.cli.bench`), ``benchmarks/run.py``, ``benchmarks/step.py`` and
``benchmarks/test_search_bench.py`` all use this package. ``import pof_fast`` does not import it;
Matplotlib and Triton load only when a function here needs them.
"""
