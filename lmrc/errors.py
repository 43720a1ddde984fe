"""Kept so that `from lmrc.utils.errors import LmrcError` keeps working; the definitions live in `lmrc.utils.errors`."""
from lmrc.utils.errors import LmrcError, LmrcWarning

__all__ = ["LmrcError", "LmrcWarning"]
