"""Triton kernels of pof-fast, shipped as ``pof_fast.kernels`` (``setup.py`` maps ``kernels/`` there).

One kernel family per module: ``line_stats`` (K-candidate l, l', l''), ``head_residual`` (softmax
residual, bias gradient and gradient norm), ``logits_free`` (K-candidate pass for large heads with
z0 and d formed tile by tile). Importing this package does not import Triton; its modules do.
"""
