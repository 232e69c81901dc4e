"""Rehearsing the paper path against local stand-ins of the hub (README.md here; `make rehearse-paper`)."""
