"""MedVMAD model package: the open_clip backbone wrapper and the MedVMAD module."""
