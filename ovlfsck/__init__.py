"""ovlfsck: offline checker and repairer for Linux overlayfs layer sets."""

__version__ = "0.1.0"
