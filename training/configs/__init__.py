"""Named configurations shipped with mpts (`mpts configs` lists them)."""
