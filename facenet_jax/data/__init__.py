"""Data: datasets, identity splits, record reading, preprocessing, sampling, face detection."""
