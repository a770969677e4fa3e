"""canao: compiler-aware neural architecture search of BERT models for edge devices."""

from __future__ import annotations

__version__ = "0.1.0"


def load(folder, rpc=None, key=None, timeout_s=60.0):  # type: ignore[no-untyped-def]
    """A shipped model (a search winner's folder) ready to ``predict(texts)``.

    See :func:`canao.deploy.load`; imported lazily so that ``import canao`` stays light.
    """
    from canao.deploy import load as load_folder

    return load_folder(folder, rpc=rpc, key=key, timeout_s=timeout_s)
