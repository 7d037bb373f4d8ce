"""Remote inference: ``dkit serve`` (the cloud side, ``server``; needs ``dkit[serve]``) and the
owner's client (``remote_model``, ``RemoteNet``; standard library only)."""

from .client import RemoteNet, is_url, remote_model

__all__ = ["RemoteNet", "is_url", "remote_model"]
