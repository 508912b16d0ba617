"""Out-of-distribution detection: feature extraction, scorers, metrics and reports."""
