"""The backends, one module each: ``torch`` (plain PyTorch), ``compiled`` (``cpp`` and ``cuda`` on the
extension ``pof_fast._C``), ``triton``. :mod:`pof_fast.dispatch` imports a backend's module only
when the backend is first asked for, so this package imports nothing optional.
"""
