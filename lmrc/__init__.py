"""lmrc: semi-supervised video object segmentation with the Local Memory Read-and-Comparator."""
__version__ = "0.1.0"
