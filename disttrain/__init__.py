"""disttrain: distributed training of generative / outlier-exposure OOD detectors."""

__version__ = "0.1.0"
