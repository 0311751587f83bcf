"""openimages-od: Open Images -> TFRecords -> TF Model Garden RetinaNet -> served detector."""

__version__ = "0.1.0"
