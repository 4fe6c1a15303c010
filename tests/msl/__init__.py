"""The Metal-on-CPU kernel harness: see harness.py and metal_compat.h."""
