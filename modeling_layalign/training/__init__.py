"""What training LayAlign needs besides the model: the shipped data and its loaders (`data`), the collapse monitor
(`monitoring`), the input mapping's warm start (`warm_start`), checks of DeepSpeed checkpoints before a resume
(`engine_checkpoints`) and the exit of a launched process (`distributed_exit`). `examples/train_layalign.py` is the
command line. Imports the model; the model never imports this."""
