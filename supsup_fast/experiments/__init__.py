"""Whole experiments built on the library: each module runs one study end to end and writes its results."""
