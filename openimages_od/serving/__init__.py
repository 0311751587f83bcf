"""HTTP detection service and the detect command (TensorFlow imported lazily)."""
