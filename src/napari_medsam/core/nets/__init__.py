"""Network modules (torch). Only :mod:`napari_medsam.core.build` composes them with hyperparameters."""
