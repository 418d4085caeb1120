"""sheepdog: a Redis-backed job runner with live progress for GeneNetwork's GEMMA scans."""

__version__ = "0.1.0"
