"""AnomalyGPT Edge: export AnomalyGPT-style detectors to engine bundles and run them on the line.

Subpackages (each a top-level folder of the repository):

- ``export``      offline, needs torch: reference models, checkpoint loaders, ONNX/GGUF export.
- ``engines``     no torch: the Engine interface, its backends and the engine bundle reader.
- ``runtime``     no torch: preprocessing, memory banks, verdicts, the daemon.
- ``calibration`` no torch: automatic thresholds from golden samples.
"""

__version__ = "0.1.0"
