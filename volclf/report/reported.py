"""The research group's published figures (SPEC §2): a reference row, never a measured run.

They come from the group's own data and runs, not from any campaign here; the report shows
them labelled ``reported`` beside the measured summary and never averages them in. The
group's "test" figures are the validation split of this toolkit, so they sit in the val columns.
"""

from __future__ import annotations

REPORTED: dict[str, dict[str, float]] = {
    # The best of the group's transformer runs.
    "vit": {"train_loss": 0.2616, "train_acc": 0.8916, "val_loss": 0.5043, "val_acc": 0.7979},
    # The group's best 3D ResNet run; val_* are its "test" loss and accuracy.
    "cnn": {"best_epoch": 99, "train_loss": 1.1192, "train_acc": 0.7839, "val_loss": 1.3018, "val_acc": 0.5971},
}

SOURCE_NOTE = {
    "vit": "best of the group's runs",
    "cnn": "the group's best run; val = their \"test\"",
}
