"""pof-fast: fast PoF (Post-training of Feature extractor, Sato et al., ICML 2022) for PyTorch.

``import pof_fast`` loads only Python modules: Triton and the compiled extension load lazily,
on the first call that needs them.
"""
from .causal_lm import causal_lm_rows
from .dispatch import backends
from .graph import CapturedSearch
from .models import split_model
from .norm import frozen_norm_stats
from .optim import PoF, PoFStats
from .search import LineSearchResult, line_losses, line_search

__version__ = "0.1.0"

__all__ = ["PoF", "PoFStats", "LineSearchResult", "CapturedSearch", "backends", "causal_lm_rows", "frozen_norm_stats",
           "line_losses", "line_search", "split_model", "__version__"]
