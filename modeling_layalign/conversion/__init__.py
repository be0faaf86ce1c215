"""The reference code's checkpoints read (`reference_checkpoint`) and converted into this package's format
(`convert`, also `python -m modeling_layalign.conversion.convert`). Imports the model; the model never imports this."""
