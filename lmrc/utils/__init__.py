"""The bottom layer, imported by every other: errors and warnings, stage timing, allocator tuning, the choice of
device and precision. Nothing here imports another part of lmrc."""
