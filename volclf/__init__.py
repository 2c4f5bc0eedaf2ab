"""volclf: train and compare 3D volume classifiers on a SLURM cluster."""

__version__ = "0.1.0"
