"""Flags a unit's or word's timing may carry (the README's "Word confidence and flags")."""

INTERPOLATED = "interpolated"  # not measured: placed between its neighbours (the aligner gave no usable time)
REPAIRED = "repaired"  # the backend's first answer was implausible; this time comes from re-aligning a smaller span
FLAGS = (INTERPOLATED, REPAIRED)
