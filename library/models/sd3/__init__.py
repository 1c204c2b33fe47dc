"""Stable Diffusion 3 / 3.5 MMDiT (Medium, 3.5 Medium, 3.5 Large/Turbo) in Stability AI's single-file layout."""
