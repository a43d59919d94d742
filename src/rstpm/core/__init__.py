"""The method core: the networks and equations of the paper, in torch only (no files, no paths).

backbones (feature pyramids) -> attention -> decoder (pair 2's student) -> losses (Eq. 1-4) ->
fusion (Eq. 5, 7) -> smoothing -> discriminative (the U-Net, Omega^7) -> focal_loss (Eq. 6) ->
model (the whole RSTPM module). Layer 0: imports nothing else of rstpm.
"""
