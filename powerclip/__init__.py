"""powerclip: DeepSpeed CLIP pretraining for compositional understanding."""

__version__ = "0.1.0"
