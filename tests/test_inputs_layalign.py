"""Checks of the model's inputs (`modeling_layalign/inputs_layalign.py`) beyond what the model's tests reach."""

import pytest
import torch

from modeling_layalign.inputs_layalign import check_labels


def test_labels_off_the_cpu_are_not_read():
    # Reading them would be a host-device sync in every training step. A meta tensor has no values: reading one raises.
    labels = torch.full((2, 3), -100, device="meta")
    with pytest.raises(RuntimeError):
        bool((labels != -100).any())
    check_labels(labels, (2, 3))
