"""qcnode: quality-control node for low-dose CT."""
__version__ = "0.1.0"
