"""`make bench`: what users feel, against baselines measured in the same run."""
