"""Kept so that `from lmrc.errors import LmrcError` (older code) keeps working; the definitions live in `lmrc.utils.errors`."""
from lmrc.utils.errors import LmrcError, LmrcWarning

__all__ = ["LmrcError", "LmrcWarning"]
